"""Benchmarks: the shared harness (timing, ceilings, results, CLI), one module per kernel family,
and the perf-regression dashboard. `python -m bench.<family> --help`."""
