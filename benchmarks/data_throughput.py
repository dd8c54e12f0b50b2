"""The command line of `sgtrain.benchmarks.data_throughput` (`--help` for its options); the benchmark lives in the
package so that `python -m sgtrain bench` runs it from an installed sgtrain too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sgtrain.benchmarks import data_throughput as suite
from sgtrain.benchmarks.harness import command_line, run_command_line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = command_line(suite.__doc__)
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--images", type=int, help="synthetic images, one epoch (default 4000)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default 500)")
    parser.add_argument("--classes", type=int, help="class folders (default 10)")
    parser.add_argument("--batch", type=int, help="ShardLoader batch size (default 64)")
    parser.add_argument("--repeats", type=int, help="timed passes per case (default 3)")
    parser.add_argument(
        "--gpu-images-per-s",
        type=float,
        help="ASSUMED real images/s one GPU consumes in BigGAN-128 training (default 1500: H100, bf16)",
    )
    parser.add_argument("--seed", type=int, help="seed of the synthetic images and the loader")
    parser.add_argument("--workdir", type=Path, help="keep the images and shards here (default: temp)")
    return run_command_line(parser, suite, argv)


if __name__ == "__main__":
    main()
