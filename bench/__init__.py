"""Benchmarks, synthetic data, tiny-model training and evaluation: everything that measures the pipeline
rather than runs it. Imports `iwp`, `actors` and `pipeline`; nothing below imports this package (only
`pipeline/cli.py`, lazily, inside the `bench` and `demo` commands)."""
