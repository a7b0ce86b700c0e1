"""Benchmarks for roadwork: every figure is a ratio of two things measured side by side in one process.

`make bench` runs them all (`python -m bench.run_all`); each writes `bench/results/<name>.json`.
"""
