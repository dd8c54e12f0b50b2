"""The command line of `sgtrain.benchmarks.sparse_overhead` (`--help` for its options); the benchmark lives in the
package so that `python -m sgtrain bench` runs it from an installed sgtrain too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sgtrain.benchmarks import sparse_overhead as suite
from sgtrain.benchmarks.harness import command_line, run_command_line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = command_line(suite.__doc__)
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--repeats", type=int, help="timed CIFAR-10 iterations per side (default 40, --quick 8)")
    parser.add_argument("--batch", type=int, help="CIFAR-10 batch (paper: 50; default 8 to fit a CPU)")
    parser.add_argument("--d-steps", type=int, help="D steps per G step (paper: 4; default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats everywhere (~3 minutes)")
    parser.add_argument("--device", help=f"the iteration's device ({suite.default_device()})")
    return run_command_line(parser, suite, argv)


if __name__ == "__main__":
    main()
