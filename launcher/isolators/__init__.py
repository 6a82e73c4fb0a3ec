"""Isolators, one module each."""
