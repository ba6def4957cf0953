"""Benchmarks, and the reference implementations and load clients the tests share with them.

Run one from the repository root as `python -m benchmarks.<name>` or `python benchmarks/<name>.py`."""
