"""The command line of `sgtrain.benchmarks.sparse_inference` (`--help` for its options); the benchmark lives in the
package so that `python -m sgtrain bench --suite export` runs it from an installed sgtrain too."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sgtrain.benchmarks import sparse_inference as suite
from sgtrain.benchmarks.harness import command_line, run_command_line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = command_line(suite.__doc__, formatter_class=argparse.HelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--densities", type=float, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, help="timed forwards per side")
    parser.add_argument("--calibration-repeats", type=int, help="timed calls per kernel and layer")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 2 cores)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    return run_command_line(parser, suite, argv)


if __name__ == "__main__":
    main()
