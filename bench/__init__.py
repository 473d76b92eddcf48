"""Benchmarks: see bench/README.md. Run with ``python -m bench``."""
