"""Benchmarks that print figures (and write JSON), never assert timings: `python -m sgtrain bench` runs them as suites,
and each module runs on its own with its full options (`python benchmarks/<name>.py --help` from the repository)."""
