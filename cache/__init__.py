"""cache: see README."""
