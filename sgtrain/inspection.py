"""`sgtrain inspect`: what a checkpoint's masks look like (densities per network and layer, exploration, step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sgtrain import checkpoint
from sgtrain.config import config_from_dict
from sgtrain.models.build import build_models
from sgtrain.sparse.manager import NETWORKS, masked_parameters
from sgtrain.sparse.topology import unpack_mask


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """The mask report of a run directory's latest checkpoint or of one checkpoint file, as plain data."""
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
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for people."""
    lines = [f"{report['checkpoint']}: step {report['step']}, sparse.method={report['method']}"]
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
