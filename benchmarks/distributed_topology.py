"""The command line of `sgtrain.benchmarks.distributed_topology` (`--help` for its options); the benchmark lives in
the package so that `python -m sgtrain bench` runs it from an installed sgtrain too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sgtrain.benchmarks import distributed_topology as suite
from sgtrain.benchmarks.harness import command_line, run_command_line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = command_line(suite.__doc__)
    parser.add_argument("--config", help="config (sparse.method=stu); default imagenet128.yaml")
    parser.add_argument("--reps", type=int, help="timed updates per case after 1 warm-up (default 3)")
    parser.add_argument("--ranks", choices=("1", "2", "both"), help="which part to run (default both)")
    parser.add_argument("--timeout", type=float, help="seconds before a part's processes are killed")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    return run_command_line(parser, suite, argv)


if __name__ == "__main__":
    main()
