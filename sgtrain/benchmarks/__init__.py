"""Benchmarks that print figures (and write JSON), never assert timings.

Each suite module holds a keyword-only ``Settings`` dataclass (its defaults are the command line's), ``run(settings)
-> dict`` and ``print_report(result)``; ``harness`` holds what they share (machine probe, timing, progress lines,
JSON). ``suites`` is `python -m sgtrain bench`, which runs them together; `python benchmarks/<name>.py --help` (from
the repository) is each suite's own command line. Benchmarks import the library; the library never imports them.
"""
