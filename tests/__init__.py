"""The test suite: a package, so that `tests.helpers` and `benchmarks` import from the repository root."""
