"""Runs `sgtrain.benchmarks.distributed_topology` (`--help` for its options); the benchmark lives in the package
so that `python -m sgtrain bench` runs it from an installed sgtrain too."""

from sgtrain.benchmarks.distributed_topology import main

if __name__ == "__main__":
    main()
