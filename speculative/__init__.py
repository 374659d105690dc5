"""speculative: see README."""
