"""`python -m sgtrain bench`: every efficiency figure sgtrain claims, measured in one process run, as one JSON.

Suites (``--suite all`` runs them in this order; each warms up, repeats and reports medians):

- ``step``: a training iteration per model config (digits, CIFAR-10; ImageNet-128 too on a GPU), dense vs the
  config's sparse method, interleaved; on the GPU when there is one (``sgtrain.benchmarks.sparse_overhead``).
- ``masks``: mask enforcement per iteration (the mask manager vs a state-dict round trip), same module.
- ``topology``: one topology update of the CIFAR-10 G + D, 1 rank vs 2 gloo ranks, sharded vs naive, with the bytes
  each rank sends (``sgtrain.benchmarks.distributed_topology``).
- ``data``: sgtrain's shard loader vs raw webdataset decode at 128 px (``sgtrain.benchmarks.data_throughput``).
- ``eval``: feature extraction, images/s: the digits classifier, and the TF-Inception network when its file is here.
- ``export``: the sparse export's file size against the dense file and the goal, and sparse vs dense inference of
  the 32x32 generator at batch 1 and 64 (``sgtrain.export``, ``sgtrain.sparse_inference``).
- ``grown``: not a speed: the first Adam step of a weight the CIFAR-10 G grows late in a run, ``|dw| / lr``, in each
  optimizer-state mode (``sgtrain.benchmarks.grown_weights``).

Each suite's figures sit under ``suites.<name>`` with the ratios measured in the same process (``summary`` holds the
headline numbers of every suite, flat). ``--tiny`` shrinks every suite to a smoke test (the test suite runs it to
check the JSON's schema): its timings mean nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sgtrain.config import ConfigError

SUITES = ("step", "masks", "topology", "data", "eval", "export", "grown")
FORMAT = "sgtrain-bench/1"


def _overhead_args(tiny: bool) -> Any:
    from sgtrain.benchmarks.sparse_overhead import parse_args

    args = parse_args(["--quick", *(["--repeats", "1", "--batch", "2"] if tiny else [])])
    if tiny:
        args.warmup, args.enforce_repeats = 1, 2
    return args


def suite_step(tiny: bool) -> dict[str, Any]:
    from sgtrain.benchmarks.sparse_overhead import bench_iteration
    from sgtrain.config import load_config
    from sgtrain.flops import config_flops

    # Per model config; ImageNet-128 only on a GPU (an iteration takes tens of seconds on a CPU).
    configs = ["digits.yaml", "cifar10.yaml"] + (["imagenet128.yaml"] if torch.cuda.is_available() else [])
    figures: dict[str, Any] = {}
    for config in configs[:1] if tiny else configs:
        args = _overhead_args(tiny)
        args.config = config
        one = bench_iteration(args)
        one["sparse_vs_dense_time"] = one["sparse"]["median_s"] / one["dense"]["median_s"]
        # What a sparse kernel could save, for comparison: masked dense training spends the dense FLOPs.
        one["sparse_vs_dense_flops"] = config_flops(load_config(config))["train_iteration"]["sparse_fraction"]
        figures[config] = one
    return {"configs": figures}


def suite_masks(tiny: bool) -> dict[str, Any]:
    from sgtrain.benchmarks.sparse_overhead import bench_enforcement

    return bench_enforcement(_overhead_args(tiny))


def suite_topology(tiny: bool) -> dict[str, Any]:
    from sgtrain.benchmarks.distributed_topology import main

    config = "digits.yaml" if tiny else "cifar10.yaml"
    figures = main(["--config", config, "--reps", "1" if tiny else "2"])
    by_case = {f"{r['ranks']}r/{r['scheme']}/{r['scores']}/{r['threads_per_rank']}t": r for r in figures["rows"]}
    figures["update_s"] = {case: row["update"]["median_s"] for case, row in by_case.items()}
    figures["sent_bytes_per_rank"] = {case: row["per_rank"][0]["sent_bytes"] for case, row in by_case.items()}
    return figures


def suite_data(tiny: bool) -> dict[str, Any]:
    from sgtrain.benchmarks.data_throughput import main

    size = ["--images", "120", "--shard-size", "30", "--repeats", "1"] if tiny else ["--images", "1200"]
    return main([*size, "--shard-size", "150"] if not tiny else size)


def suite_eval(tiny: bool) -> dict[str, Any]:
    from sgtrain.metrics.classifier import classifier_extractor
    from sgtrain.metrics.features import find_inception_file, inception_extractor
    from sgtrain.sparse_inference import median_seconds

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
    from sgtrain.sparse_inference import benchmark_inference
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
    densities = (1.0, 0.1) if tiny else (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
    batches = (1, 4) if tiny else (1, 64)
    repeats = 1 if tiny else 3
    figures["inference"] = benchmark_inference(
        densities=densities,
        batches=batches,
        repeats=repeats,
        calibration_repeats=repeats,
        threads=torch.get_num_threads(),
    )
    return figures


def suite_grown(tiny: bool) -> dict[str, Any]:
    from sgtrain.benchmarks.grown_weights import run_all

    return run_all(warmup=2, batch_size=2) if tiny else run_all()


def _quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with its stdout and stderr (progress bars, start lines) discarded."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


SUITE_FUNCTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "step": suite_step,
    "masks": suite_masks,
    "topology": suite_topology,
    "data": suite_data,
    "eval": suite_eval,
    "export": suite_export,
    "grown": suite_grown,
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from sgtrain.benchmarks.sparse_overhead import cpu_model

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_start": list(os.getloadavg()),
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


def run_bench(suite: str = "all", json_path: str | Path | None = None, *, tiny: bool = False) -> dict[str, Any]:
    """Run ``suite`` (a name of :data:`SUITES`, a comma-separated list, or ``all``) and return (and write) the
    figures as ``{"format", "machine", "suites": {name: figures}, "summary", "wall_s"}``."""
    names = list(SUITES) if suite == "all" else [s.strip() for s in str(suite).split(",") if s.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise ConfigError(f"--suite must be all or some of {', '.join(SUITES)}, got {suite!r}")
    if json_path is not None and not Path(json_path).parent.is_dir():
        raise ConfigError(f"--json {json_path}: its directory does not exist")
    start = time.perf_counter()
    result: dict[str, Any] = {"format": FORMAT, "command": " ".join(sys.argv), "machine": machine(), "tiny": tiny}
    result["suites"] = {}
    threads = torch.get_num_threads()
    for name in names:
        print(f"sgtrain bench: {name} ...", file=sys.stderr, flush=True)
        torch.set_num_threads(threads)  # a suite may pin its own count (data: 1 core); the next starts afresh
        began = time.perf_counter()
        figures = SUITE_FUNCTIONS[name](tiny)
        figures["wall_s"] = time.perf_counter() - began
        result["suites"][name] = figures
    result["summary"] = summarize(result["suites"])
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - start
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """The headline figures, one per line."""
    lines = [f"sgtrain bench on {result['machine']['cpu_model']} ({result['machine']['cpus']} CPUs"]
    lines[0] += f", GPU {result['machine']['gpu']})" if result["machine"]["gpu"] else ", no GPU)"
    for key, value in result["summary"].items():
        lines.append(f"  {key}: {json.dumps(value, default=str)}")
    lines.append(f"  wall time: {result['wall_s']:.0f} s")
    return "\n".join(lines)
