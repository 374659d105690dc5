"""Executors run a step plan: the functional one (real tokens from the NumPy model) and the timing
one (no token values)."""
