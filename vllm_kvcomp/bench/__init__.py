"""Benchmark and evidence harnesses (run on a GPU machine; see README)."""
