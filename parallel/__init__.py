"""parallel: see README."""
