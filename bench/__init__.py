"""Benchmarks run by hand, not by ``make test``: ``python -m bench.quality --help``."""
