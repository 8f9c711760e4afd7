"""Benchmarks for issue 6: `python -m bench` (full) or `python -m bench --short --check`."""
