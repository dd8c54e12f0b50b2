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

import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgtrain.benchmarks.harness import load_avg, machine, write_json
from sgtrain.config import load_config
from sgtrain.parts import build_training
from sgtrain.sparse_inference import compile_sparse, interleaved_medians


@dataclass(kw_only=True)
class Settings:
    """Which generators, at which batch sizes, timed how often."""

    config: str = "cifar10.yaml"
    densities: Sequence[float] = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)  # overall G densities
    batches: Sequence[int] = (1, 64)
    repeats: int = 5  # timed forwards per side
    calibration_repeats: int = 3  # timed calls per kernel and layer
    threads: int = 2  # torch.set_num_threads (2: the benchmark machine's cores)
    json: Path | None = None  # run() also writes every figure here, per-layer choices too


def sparse_generator(config: str, density: float) -> nn.Module:
    """The generator of ``config`` with a random (static) ERK mask at overall density ``density``, in eval mode."""
    method = "static" if density < 1 else "dense"
    overrides = {"sparse.method": method, "sparse.density_g": density, "sparse.density_d": 1.0}
    G, _, _, _, masks = build_training(load_config(config, overrides))
    masks.initialize()  # draws the masks and zeroes the inactive weights
    return G.eval().requires_grad_(False)


def run(settings: Settings) -> dict[str, Any]:
    """Dense eval generator vs :func:`compile_sparse` at each density and batch: median seconds per forward.

    Returns ``{"meta": ..., "results": [{"density", "batch", "dense_s", "compiled_s", "speedup", "sparse_layers",
    "layers", "max_abs_diff", "plan"}, ...]}``; dense and compiled forwards are timed round-robin. Also written to
    ``settings.json`` when set.
    """
    torch.set_num_threads(settings.threads)
    meta = (
        {"config": settings.config}
        | machine("torch", "threads", "cpus")
        | {
            "repeats": settings.repeats,
            "calibration_repeats": settings.calibration_repeats,
            "load_avg_start": load_avg(),
        }
    )
    results = []
    for density in settings.densities:
        G = sparse_generator(settings.config, density)
        for batch in settings.batches:
            generator = torch.Generator().manual_seed(batch)
            z = torch.randn(batch, G.dim_z, generator=generator)
            y = torch.randint(G.n_classes, (batch,), generator=generator)
            start = time.perf_counter()
            compiled = compile_sparse(G, batch_size=batch, repeats=settings.calibration_repeats)
            compile_s = time.perf_counter() - start
            with torch.no_grad():
                diff = float((compiled(z, y) - G(z, y)).abs().max())
                dense_s, compiled_s = interleaved_medians(
                    [functools.partial(G, z, y), functools.partial(compiled, z, y)], settings.repeats
                )
            plan = [dataclasses.asdict(choice) for choice in compiled.sparse_plan]
            results.append(
                {
                    "density": density,
                    "batch": batch,
                    "dense_s": dense_s,
                    "compiled_s": compiled_s,
                    "speedup": dense_s / compiled_s,
                    "sparse_layers": sum(choice["choice"] == "sparse" for choice in plan),
                    "layers": len(plan),
                    "max_abs_diff": diff,
                    "compile_s": compile_s,
                    "plan": plan,
                }
            )
    meta["load_avg_end"] = load_avg()
    result = {"meta": meta, "results": results}
    if settings.json is not None:
        write_json(settings.json, result)
    return result


def print_report(result: dict[str, Any]) -> None:
    """The table of a :func:`run` result, on stdout."""
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
