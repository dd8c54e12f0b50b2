"""`python -m sgtrain bench`: every efficiency figure sgtrain claims, measured in one process run, as one JSON.

Suites (``--suite all`` runs them in this order; each warms up, repeats and reports medians):

- ``step``: a training iteration per model config (digits, CIFAR-10; ImageNet-128 too on a GPU), dense vs the
  config's sparse method, interleaved; on the GPU when there is one (``sgtrain.benchmarks.sparse_overhead``).
- ``masks``: mask enforcement per iteration (the mask manager vs a state-dict round trip), same module.
- ``balance``: ADAPT's balance-ratio sampling per CIFAR-10 iteration: a sample every ``sparse.adapt.sample_every``
  iterations vs none, interleaved in blocks of that many iterations, and one balance pass measured directly; on the
  GPU when there is one (same module).
- ``topology``: one topology update of the CIFAR-10 G + D, 1 rank vs 2 gloo ranks, sharded vs naive, with the bytes
  each rank sends (``sgtrain.benchmarks.distributed_topology``).
- ``data``: sgtrain's shard loader vs raw webdataset decode at 128 px (``sgtrain.benchmarks.data_throughput``).
- ``eval``: feature extraction, images/s: the digits classifier, and the TF-Inception network when its file is here.
- ``export``: the sparse export's file size against the dense file and the goal, and sparse vs dense inference of
  the 32x32 generator at batch 1 and 64 (``sgtrain.export``, ``sgtrain.benchmarks.sparse_inference``).
- ``grown``: not a speed: the first Adam step of a weight the CIFAR-10 G grows late in a run, ``|dw| / lr``, in each
  optimizer-state mode (``sgtrain.benchmarks.grown_weights``).

Each suite's figures sit under ``suites.<name>`` with the ratios measured in the same process (``summary`` holds the
headline numbers of every suite, flat). ``--tiny`` shrinks every suite to a smoke test (the test suite runs it to
check the JSON's schema): its timings mean nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sgtrain.benchmarks import data_throughput, distributed_topology, grown_weights, sparse_inference, sparse_overhead
from sgtrain.benchmarks.harness import load_avg, machine, median_seconds, progress, write_json
from sgtrain.config import ConfigError

SUITES = ("step", "masks", "balance", "topology", "data", "eval", "export", "grown")
FORMAT = "sgtrain-bench/1"


def _overhead_settings(tiny: bool) -> sparse_overhead.Settings:
    """The step, masks and balance suites' settings: ``sparse_overhead``'s quick counts; tiny, one timed round at
    batch 2."""
    if tiny:
        return sparse_overhead.Settings(quick=True, repeats=1, batch=2, warmup=1, enforce_repeats=2, balance_repeats=1)
    return sparse_overhead.Settings(quick=True)


def suite_step(tiny: bool) -> dict[str, Any]:
    from sgtrain.config import load_config
    from sgtrain.flops import config_flops

    # Per model config; ImageNet-128 only on a GPU (an iteration takes tens of seconds on a CPU).
    configs = ["digits.yaml", "cifar10.yaml"] + (["imagenet128.yaml"] if torch.cuda.is_available() else [])
    figures: dict[str, Any] = {}
    for config in configs[:1] if tiny else configs:
        one = sparse_overhead.bench_iteration(_overhead_settings(tiny), config)
        one["sparse_vs_dense_time"] = one["sparse"]["median_s"] / one["dense"]["median_s"]
        # What a sparse kernel could save, for comparison: masked dense training spends the dense FLOPs.
        one["sparse_vs_dense_flops"] = config_flops(load_config(config))["train_iteration"]["sparse_fraction"]
        figures[config] = one
    return {"configs": figures}


def suite_masks(tiny: bool) -> dict[str, Any]:
    return sparse_overhead.bench_enforcement(_overhead_settings(tiny))


def suite_balance(tiny: bool) -> dict[str, Any]:
    figures = sparse_overhead.bench_balance(_overhead_settings(tiny), "digits.yaml" if tiny else "cifar10_adapt.yaml")
    sparse_overhead.print_balance(figures)
    return figures


def suite_topology(tiny: bool) -> dict[str, Any]:
    config = "digits.yaml" if tiny else "cifar10.yaml"
    figures = distributed_topology.run(distributed_topology.Settings(config=config, reps=1 if tiny else 2))
    distributed_topology.print_report(figures)
    by_case = {f"{r['ranks']}r/{r['scheme']}/{r['scores']}/{r['threads_per_rank']}t": r for r in figures["rows"]}
    figures["update_s"] = {case: row["update"]["median_s"] for case, row in by_case.items()}
    figures["sent_bytes_per_rank"] = {case: row["per_rank"][0]["sent_bytes"] for case, row in by_case.items()}
    return figures


def suite_data(tiny: bool) -> dict[str, Any]:
    size = {"images": 120, "shard_size": 30, "repeats": 1} if tiny else {"images": 1200, "shard_size": 150}
    figures = data_throughput.run(data_throughput.Settings(**size))
    data_throughput.print_report(figures)
    return figures


def suite_eval(tiny: bool) -> dict[str, Any]:
    from sgtrain.metrics.classifier import classifier_extractor
    from sgtrain.metrics.features import find_inception_file, inception_extractor

    figures: dict[str, Any] = {}
    images = torch.rand(64 if tiny else 512, 3, 32, 32) * 2 - 1
    extractor = classifier_extractor("digits", 32)
    seconds = median_seconds(lambda: extractor(images), repeats=1 if tiny else 3)
    figures["classifier_32px"] = {"images": len(images), "median_s": seconds, "images_per_s": len(images) / seconds}
    if find_inception_file() is None:
        figures["inception"] = None  # the file is not installed: nothing measured
    else:
        extractor = inception_extractor(batch_size=16)
        batch = images[: 4 if tiny else 32]
        seconds = median_seconds(lambda: extractor(batch), repeats=1 if tiny else 2)
        figures["inception"] = {"images": len(batch), "median_s": seconds, "images_per_s": len(batch) / seconds}
    return figures


def suite_export(tiny: bool) -> dict[str, Any]:
    from sgtrain.config import load_config
    from sgtrain.export import export_generator
    from sgtrain.train import train

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sgtrain-bench-export-") as tmp:
        sizes = {}
        for density in (0.5, 0.1) if tiny else (0.5, 0.3, 0.2, 0.1, 0.05):
            run_dir = Path(tmp) / f"g{density}"
            overrides = {"run_dir": str(run_dir), "data.shards": None, "train.steps": 1, "sparse.method": "static"}
            overrides |= {"sparse.density_g": density, "train.batch_size": 8, "train.log_every": 1}
            if not tiny:
                overrides |= {"model.g_ch": 32}  # a 32x32 G with layers of realistic width
            cfg = load_config("digits.yaml", overrides)
            _quietly(lambda cfg=cfg: train(cfg))
            summary = export_generator(run_dir, Path(tmp) / f"g{density}.sgt")
            coded = [layer for layer in summary["layers"].values() if layer["coded"]]
            summary["coded_bytes"] = sum(layer["bytes"] for layer in coded)
            summary["goal_bytes"] = sum(layer["goal_bytes"] for layer in coded)  # 1.2 x density x dense, per layer
            summary["coded_vs_goal"] = summary["coded_bytes"] / max(summary["goal_bytes"], 1)
            sizes[str(density)] = summary
        figures["size"] = sizes
    repeats = 1 if tiny else 3
    figures["inference"] = sparse_inference.run(
        sparse_inference.Settings(
            densities=(1.0, 0.1) if tiny else (1.0, 0.5, 0.3, 0.2, 0.1, 0.05),
            batches=(1, 4) if tiny else (1, 64),
            repeats=repeats,
            calibration_repeats=repeats,
            threads=torch.get_num_threads(),
        )
    )
    return figures


def suite_grown(tiny: bool) -> dict[str, Any]:
    return grown_weights.run(grown_weights.Settings(warmup=2, batch_size=2) if tiny else grown_weights.Settings())


def _quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with its stdout and stderr (progress bars, start lines) discarded."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


SUITE_FUNCTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "step": suite_step,
    "masks": suite_masks,
    "balance": suite_balance,
    "topology": suite_topology,
    "data": suite_data,
    "eval": suite_eval,
    "export": suite_export,
    "grown": suite_grown,
}


def summarize(suites: dict[str, Any]) -> dict[str, Any]:
    """The headline figure of every suite that ran, flat (the README table's rows)."""
    out: dict[str, Any] = {}
    if "step" in suites:
        for config, step in suites["step"]["configs"].items():
            name = config.removesuffix(".yaml")
            out[f"step_{name}_dense_s"], out[f"step_{name}_sparse_s"] = (
                step["dense"]["median_s"],
                step["sparse"]["median_s"],
            )
            out[f"step_{name}_sparse_vs_dense_time"] = step["sparse_vs_dense_time"]
            out[f"step_{name}_sparse_vs_dense_flops"] = step["sparse_vs_dense_flops"]
    if "masks" in suites:
        out["masks_manager_s"] = suites["masks"]["manager"]["median_s"]
        out["masks_speedup_vs_state_dict"] = suites["masks"]["speedup"]
    if "balance" in suites:
        balance = suites["balance"]
        out["balance_sampling_s"], out["balance_none_s"] = balance["sampling"]["median_s"], balance["none"]["median_s"]
        out["balance_overhead_pct"] = balance["overhead_pct"]
        out["balance_overhead_paired_pct"] = balance["overhead_paired_pct"]
        out["balance_pass_s"] = balance["balance_pass"]["median_s"]
        out["balance_pass_per_iteration_pct"] = balance["pass_per_iteration_pct"]
    if "topology" in suites:
        out["topology_update_s"] = suites["topology"]["update_s"]
    if "data" in suites:
        out["data_loader_vs_raw_decode"] = suites["data"]["ratio"]
    if "eval" in suites:
        out["eval_classifier_images_per_s"] = suites["eval"]["classifier_32px"]["images_per_s"]
        inception = suites["eval"]["inception"]
        out["eval_inception_images_per_s"] = inception["images_per_s"] if inception else None
    if "export" in suites:
        sizes = suites["export"]["size"].items()
        out["export_file_vs_dense"] = {d: s["ratio"] for d, s in sizes}
        out["export_coded_vs_goal"] = {d: s["coded_vs_goal"] for d, s in sizes}
        out["inference_speedup"] = {
            f"{row['density']}@{row['batch']}": row["speedup"] for row in suites["export"]["inference"]["results"]
        }
    if "grown" in suites:
        out["grown_first_step_vs_lr_median"] = {
            mode: r["grown"]["median"] for mode, r in suites["grown"]["modes"].items()
        }
    return out


@dataclass(kw_only=True)
class Settings:
    """Which suites to run, and where to write the JSON."""

    suite: str = "all"  # a name of SUITES, a comma-separated list of them, or all
    json: Path | str | None = None  # also write every figure here (its directory must exist)
    tiny: bool = False  # every suite shrunk to a smoke test: its timings mean nothing

    def __post_init__(self) -> None:
        names = self.names
        if not names or any(name not in SUITES for name in names):
            raise ConfigError(f"--suite must be all or some of {', '.join(SUITES)}, got {self.suite!r}")
        # Checked before any suite runs, not after minutes of measuring.
        if self.json is not None and not Path(self.json).parent.is_dir():
            raise ConfigError(f"--json {self.json}: its directory does not exist")

    @property
    def names(self) -> list[str]:
        """The suites to run, in the order named."""
        return list(SUITES) if self.suite == "all" else [s.strip() for s in str(self.suite).split(",") if s.strip()]


def run(settings: Settings) -> dict[str, Any]:
    """Run the suites of ``settings`` and return (and write) the figures as ``{"format", "command", "machine",
    "tiny", "suites": {name: figures}, "summary", "wall_s"}``."""
    start = time.perf_counter()
    probe = machine("date", "cpu_model", "cpus", "torch_threads", "gpu", "torch", "python", "load_avg_start")
    result: dict[str, Any] = {"format": FORMAT, "command": " ".join(sys.argv), "machine": probe, "tiny": settings.tiny}
    result["suites"] = {}
    threads = torch.get_num_threads()
    for name in settings.names:
        progress(f"sgtrain bench: {name} ...", stamp=False)
        torch.set_num_threads(threads)  # a suite may pin its own count (data: 1 core); the next starts afresh
        began = time.perf_counter()
        figures = SUITE_FUNCTIONS[name](settings.tiny)
        figures["wall_s"] = time.perf_counter() - began
        result["suites"][name] = figures
    result["summary"] = summarize(result["suites"])
    result["machine"]["load_avg_end"] = load_avg()
    result["wall_s"] = time.perf_counter() - start
    if settings.json is not None:
        write_json(settings.json, result, indent=1)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """The headline figures, one per line."""
    lines = [f"sgtrain bench on {result['machine']['cpu_model']} ({result['machine']['cpus']} CPUs"]
    lines[0] += f", GPU {result['machine']['gpu']})" if result["machine"]["gpu"] else ", no GPU)"
    for key, value in result["summary"].items():
        lines.append(f"  {key}: {json.dumps(value, default=str)}")
    lines.append(f"  wall time: {result['wall_s']:.0f} s")
    return "\n".join(lines)
