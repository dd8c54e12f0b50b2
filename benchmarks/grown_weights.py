"""The command line of `sgtrain.benchmarks.grown_weights` (`--help` for its options); the benchmark lives in the
package so that `python -m sgtrain bench --suite grown` runs it from an installed sgtrain too."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sgtrain.benchmarks import grown_weights as suite
from sgtrain.benchmarks.harness import command_line, parse_settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = command_line(suite.__doc__, formatter_class=argparse.HelpFormatter)
    parser.add_argument("--warmup", type=int, help="training iterations before the update")
    parser.add_argument("--batch", type=int, dest="batch_size", metavar="BATCH", help="global batch of the iterations")
    parser.add_argument("--adam-step", type=int, help="Adam's step count at the update")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    result = suite.run(parse_settings(parser, suite.Settings, argv))
    suite.print_report(result)
    return result


if __name__ == "__main__":
    main()
