"""Benchmarks: ``python -m benchmarks.NAME``; each prints ratios against a baseline measured in
the same run and writes JSON."""
