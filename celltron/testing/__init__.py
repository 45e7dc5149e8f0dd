"""Helpers for equivalence tests and benchmarks: access to reference implementations."""
