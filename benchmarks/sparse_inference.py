"""Sparse inference on CPU: the CIFAR-10 generator run dense vs compiled by ``sgtrain.sparse_inference``.

For each overall G density (random static ERK masks) and batch size, the median time per forward of the dense eval
generator and of ``compile_sparse`` (sparse CSR kernels where they measured faster, dense elsewhere), their ratio, how
many layers chose sparse, and the largest difference between the two outputs.

Usage (from the repository root)::

    python benchmarks/sparse_inference.py                           # ~3 minutes on 2 CPU cores
    python benchmarks/sparse_inference.py --threads 1 --batches 1 8 --densities 1 0.1
    python benchmarks/sparse_inference.py --json results.json       # also write every figure, per-layer choices too

This is a benchmark: it prints figures and never asserts timings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sgtrain.sparse_inference import benchmark_inference


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"sgtrain sparse inference: {meta['config']} generator, torch {meta['torch']}, {meta['threads']} thread(s)")
    print(f"load average (1 min) {meta['load_avg_start'][0]:.2f} at start, {meta['load_avg_end'][0]:.2f} at end")
    print(f"median of {meta['repeats']} interleaved forwards each; layer choices from {meta['calibration_repeats']}")
    print(f"{'density':>8}{'batch':>7}{'dense':>11}{'compiled':>11}{'speed-up':>10}{'sparse':>9}{'max diff':>10}")
    for r in result["results"]:
        print(
            f"{r['density']:>8.2f}{r['batch']:>7}{r['dense_s'] * 1e3:>9.1f}ms{r['compiled_s'] * 1e3:>9.1f}ms"
            f"{r['speedup']:>9.2f}x{r['sparse_layers']:>4}/{r['layers']:<4}{r['max_abs_diff']:>10.1e}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cifar10.yaml")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1, 0.05])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per side")
    parser.add_argument("--calibration-repeats", type=int, default=3, help="timed calls per kernel and layer")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    result = benchmark_inference(
        config=args.config,
        densities=args.densities,
        batches=args.batches,
        repeats=args.repeats,
        calibration_repeats=args.calibration_repeats,
        threads=args.threads,
    )
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
