"""`sgtrain inspect`: what a checkpoint's masks look like (densities per network and layer, exploration, step), and
under ADAPT the state of D's density rule (balance window, latest decision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sgtrain import checkpoint
from sgtrain.config import AdaptConfig, config_from_dict
from sgtrain.models.build import build_models
from sgtrain.sparse.balance import balance_ratios
from sgtrain.sparse.manager import NETWORKS, masked_parameters
from sgtrain.sparse.topology import unpack_mask


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """The mask report of a run directory's latest checkpoint or of one checkpoint file, as plain data (with an
    ``"adapt"`` entry for an ADAPT run only)."""
    source, state = checkpoint.load_run_or_file(path)
    cfg = config_from_dict(state["config"])
    # Only the names and shapes of the masked layers are needed: build with the cheap init (ortho's QR is slow).
    modules = dict(zip(NETWORKS, build_models(cfg.model, cfg.seed, weights_follow=True), strict=True))
    saved = state.get("masks", {}).get("layers", {})
    targets = {"G": cfg.sparse.density_g, "D": cfg.sparse.density_d}
    report: dict[str, Any] = {"checkpoint": str(source), "step": int(state["step"]), "method": cfg.sparse.method}
    report["networks"] = {}
    for net in NETWORKS:
        layers, active_total, union_total, numel_total = [], 0, 0, 0
        for name, param in masked_parameters(modules[net], cfg.sparse.targets):
            weight = state[net][f"{name}.weight"]
            entry = saved.get(f"{net}.{name}")
            if entry is None:  # dense training: every weight is active
                active = union = param.numel()
            else:
                active = int(unpack_mask(entry["mask"], param.shape).sum())
                union = int(unpack_mask(entry["union"], param.shape).sum())
            layers.append(
                {
                    "name": name,
                    "shape": list(param.shape),
                    "numel": param.numel(),
                    "active": active,
                    "nnz": int(torch.count_nonzero(weight)),
                    "density": active / param.numel(),
                }
            )
            active_total += active
            union_total += union
            numel_total += param.numel()
        report["networks"][net] = {
            "target_density": targets[net],
            "density": active_total / max(numel_total, 1),
            "itop_rate": union_total / max(numel_total, 1),
            "layers": layers,
        }
    method_state = state.get("masks", {}).get("method_state", {})  # absent in checkpoints older than ADAPT
    if "window" in method_state:
        report["adapt"] = _adapt_state(cfg.sparse.adapt, method_state)
    return report


def _adapt_state(adapt: AdaptConfig, state: dict[str, Any]) -> dict[str, Any]:
    """ADAPT's rule as configured and where it stands: D's density, the balance window, the latest decision."""
    samples = state["window"]["samples"]  # [n, 3] float64: (real, before, after) global means, oldest first
    return {
        "variant": adapt.variant,
        "lower": adapt.lower,
        "upper": adapt.upper,
        "minimum": adapt.minimum,
        "highest": adapt.highest,
        "d_density": float(state["d_density"]),
        "window_size": int(state["window"]["size"]),
        "window_samples": len(samples),
        # The mean of the samples so far, as metrics.jsonl's adapt/balance_ratio; decisions wait for a full window.
        "balance_ratio": float(balance_ratios(samples).mean()) if len(samples) else None,
        "decisions": int(state["decisions"]),
        "decision": str(state["decision"]) if state["decisions"] else None,
        "decided_ratio": None if state["ratio"] is None else float(state["ratio"]),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for people."""
    lines = [f"{report['checkpoint']}: step {report['step']}, sparse.method={report['method']}"]
    if "adapt" in report:
        lines += ["", *_format_adapt(report["adapt"])]
    for net, info in report["networks"].items():
        lines.append("")
        lines.append(
            f"{net}: density {info['density']:.4f} (target {info['target_density']:.4f}), "
            f"exploration (ITOP) rate {info['itop_rate']:.4f}"
        )
        lines.append(f"  {'layer':<28}{'shape':<20}{'numel':>11}{'active':>11}{'nnz':>11}{'density':>9}")
        for layer in info["layers"]:
            shape = "x".join(str(d) for d in layer["shape"])
            lines.append(
                f"  {layer['name']:<28}{shape:<20}{layer['numel']:>11}{layer['active']:>11}{layer['nnz']:>11}"
                f"{layer['density']:>9.4f}"
            )
    return "\n".join(lines)


def _format_adapt(adapt: dict[str, Any]) -> list[str]:
    ratio = "none yet" if adapt["balance_ratio"] is None else f"{adapt['balance_ratio']:.4f}"
    latest = "none yet"
    if adapt["decision"] is not None:
        latest = f"{adapt['decision']} at ratio {adapt['decided_ratio']:.4f} (decisions so far: {adapt['decisions']})"
    return [
        f"ADAPT ({adapt['variant']}): D density {adapt['d_density']:.4f} "
        f"(floor {adapt['minimum']:g}, highest {adapt['highest']:g}), bounds [{adapt['lower']:g}, {adapt['upper']:g}]",
        f"  balance window {adapt['window_samples']} of {adapt['window_size']} samples, mean ratio {ratio}",
        f"  latest decision: {latest}",
    ]
