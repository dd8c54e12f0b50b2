"""Runs `sgtrain.benchmarks.grown_weights` (`--help` for its options); the benchmark lives in the package
so that `python -m sgtrain bench --suite grown` runs it from an installed sgtrain too."""

from sgtrain.benchmarks.grown_weights import main

if __name__ == "__main__":
    main()
