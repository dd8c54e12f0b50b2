"""`sgtrain export`: write a run's EMA generator as one compact, data-only file (format: :mod:`sgtrain.codec`).

Reading such a file back is :func:`sgtrain.generators.load_exported`; this module only writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgtrain import checkpoint
from sgtrain.codec import FORMAT, rice_encode
from sgtrain.config import ConfigError, config_from_dict, config_to_dict
from sgtrain.sparse.topology import unpack_mask

GOAL_FACTOR = 1.2  # a coded layer's values + positions must fit in 1.2 x density x its dense bytes


# ---------------------------------------------------------------------------------------------------------------------
# Export.


def _ema_masks(state: dict[str, Any], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool masks of the EMA generator's masked weights, by state-dict key (layers trained dense are absent).

    The mask the EMA last saw (``ema_mask``) is the one it is zero outside of: a checkpoint is written after the step's
    topology update, so G's current ``mask`` may already differ. Any weight that is non-zero outside it (a sign bit
    included, so -0.0 survives) is kept too: the export is exact whatever the checkpoint holds. Active weights that are
    exactly zero stay positions: a mask read from the values alone would drop them (harmless) but also change nnz.
    """
    masks = {}
    for key, entry in state.get("masks", {}).get("layers", {}).items():
        if not key.startswith("G."):
            continue
        name = f"{key[2:]}.weight"
        weight = ema[name]
        nonzero = weight != 0
        if weight.is_floating_point():
            nonzero |= torch.signbit(weight)
        masks[name] = unpack_mask(entry.get("ema_mask", entry["mask"]), weight.shape) | nonzero
    return masks


def export_generator(run_or_checkpoint: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the EMA generator of a run directory's latest checkpoint (or of one checkpoint file) to ``out``.

    Returns a summary: ``file_bytes``, ``dense_bytes`` (the same state dict saved dense with safetensors), ``ratio``
    (file / dense), ``goal_met`` and per layer its ``numel``, ``nnz``, ``density``, ``k``, ``bits_per_nnz`` (position
    bits per non-zero), ``bytes`` (values + positions), ``goal_bytes`` and ``goal_met``, or ``"coded": False`` when
    stored dense.
    """
    from safetensors.torch import save

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists: pass --force to overwrite it")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory, not a file name")
    source, state = checkpoint.load_run_or_file(run_or_checkpoint)
    cfg = config_from_dict(state["config"])
    ema = {name: tensor.detach().cpu().contiguous() for name, tensor in state["ema"].items()}
    masks = _ema_masks(state, ema)

    tensors, layers, summary_layers = {}, {}, {}
    for name, tensor in ema.items():
        mask = masks.get(name)
        if mask is None:  # trained dense
            tensors[name] = tensor
            continue
        flat = mask.reshape(-1)
        indices = np.flatnonzero(flat.numpy())
        numel, nnz = tensor.numel(), len(indices)
        summary = {"numel": numel, "nnz": nnz, "density": nnz / numel}
        k, quotients, remainders = rice_encode(indices)
        values = tensor.reshape(-1)[flat]
        coded = values.nbytes + len(quotients) + len(remainders)
        if coded >= tensor.nbytes:  # fully or nearly dense: the code would not save anything
            tensors[name] = tensor
            summary_layers[name] = {**summary, "coded": False}
            continue
        tensors[f"{name}:values"] = values
        tensors[f"{name}:rice_q"] = torch.from_numpy(quotients)
        tensors[f"{name}:rice_r"] = torch.from_numpy(remainders)
        layers[name] = {"shape": list(tensor.shape), "nnz": nnz, "k": k}
        goal = GOAL_FACTOR * nnz / numel * tensor.nbytes
        summary_layers[name] = {
            **summary,
            "coded": True,
            "k": k,
            "bits_per_nnz": 8 * (len(quotients) + len(remainders)) / max(nnz, 1),
            "bytes": coded,
            "goal_bytes": goal,
            "goal_met": coded <= goal,
        }

    metadata = {
        "format": FORMAT,
        "config": json.dumps(config_to_dict(cfg)),
        "step": str(int(state["step"])),
        "source": str(source),
        "source_sha256": checkpoint.file_sha256(source),
        "layers": json.dumps(layers),
    }
    data = save(tensors, metadata=metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(out, data)
    dense_bytes = len(save(ema))
    return {
        "path": str(out),
        "source": str(source),
        "step": int(state["step"]),
        "file_bytes": len(data),
        "dense_bytes": dense_bytes,
        "ratio": len(data) / dense_bytes,
        "goal_met": all(layer.get("goal_met", True) for layer in summary_layers.values()),
        "layers": summary_layers,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """One line for people: where, how big against dense, whether every coded layer met the size goal."""
    coded = [layer for layer in summary["layers"].values() if layer["coded"]]
    met = sum(layer["goal_met"] for layer in coded)
    goal = f"size goal met in {met}/{len(coded)} sparse layers" + ("" if met == len(coded) else " (NOT met)")
    return (
        f"sgtrain: {summary['path']}: {summary['file_bytes']:,} bytes (dense {summary['dense_bytes']:,}, "
        f"ratio {summary['ratio']:.3f}); EMA generator of {summary['source']} (step {summary['step']}); {goal}"
    )
