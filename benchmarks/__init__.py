"""Benchmark harness (see issue 3)."""
