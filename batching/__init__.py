"""batching: see README."""
