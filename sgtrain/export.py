"""`sgtrain export`: a run's EMA generator as one compact, data-only file (safetensors), sparse layers coded.

A sparse generator stored dense wastes most of its bytes on zeros. Here each masked weight tensor is stored as

* ``NAME:values``     its active weights in row-major (flat) order, in their own dtype (float32 stays float32, exact);
* ``NAME:rice_q``     the positions' Golomb-Rice quotients in unary (``q`` ones then a zero), bit-packed;
* ``NAME:rice_r``     their ``k``-bit remainders, bit-packed, most significant bit first;

where the coded numbers are the gaps between consecutive active flat indices minus one (the first counted from -1).
Two streams instead of one interleaved Rice code keep decoding vectorised: the quotients are the distances between
the zero bits of the unary stream (``np.flatnonzero``), the remainders a fixed-width reshape. Every other tensor of the
EMA state dict (biases, BN statistics and gains, embeddings, SN ``u``/``sv`` buffers, layers trained dense, and masked
layers whose code would not be smaller, i.e. density ~0.97 and up) is stored as is. The metadata holds the format
tag, the resolved config (to rebuild the Generator), the step, the source checkpoint's sha256 and per coded layer its
shape, nnz and ``k``.

Size. Active positions of a random mask at density p carry H(p)/p bits per non-zero (4.7 at p=0.1, 5.7 at 0.05);
Rice coding with the best ``k`` comes within ~2% of that (measured on a 256x256x3x3 layer: 2.00 / 2.96 / 3.69 / 4.76 /
5.78 bits at p = 0.5 / 0.3 / 0.2 / 0.1 / 0.05). The goal, values plus positions within 1.2 x density x the dense bytes
of a layer, leaves 0.2 x 32 = 6.4 bits per non-zero for the positions (float32 values): it is met down to p = 0.035
(6.30 bits) and missed below about p = 0.032, where H(p)/p itself exceeds 6.4 bits, so no position code can meet it
(8.1 bits at p = 0.01: values + positions are then 1.04 x the goal, still 1/80 of the dense layer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgtrain import checkpoint
from sgtrain.config import ConfigError, config_from_dict, config_to_dict
from sgtrain.sampling import LoadedGenerator
from sgtrain.sparse.topology import unpack_mask

FORMAT = "sgtrain-sparse-generator/1"
MAX_K = 16  # remainder bits tried per layer: enough for gaps of mean ~2**16, i.e. densities down to ~1e-5
GOAL_FACTOR = 1.2  # a coded layer's values + positions must fit in 1.2 x density x its dense bytes


# ---------------------------------------------------------------------------------------------------------------------
# Golomb-Rice coding of sorted positions.


def rice_bits(indices: np.ndarray) -> np.ndarray:
    """Total coded bits ``[MAX_K + 1]`` of the sorted flat ``indices`` for each Rice parameter ``k = 0..MAX_K``."""
    gaps = np.diff(indices.astype(np.int64), prepend=-1) - 1
    ks = np.arange(MAX_K + 1)
    quotients = np.array([int((gaps >> k).sum()) for k in ks], dtype=np.int64)
    # Per position: q ones and a terminating zero in the unary stream, k remainder bits.
    return quotients + len(gaps) * (1 + ks)


def rice_encode(indices: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Sorted, distinct flat ``indices`` ``[nnz]`` -> ``(k, quotients, remainders)``, the two streams bit-packed
    ``uint8``; ``k`` minimises the total size."""
    indices = np.asarray(indices, dtype=np.int64)
    k = int(np.argmin(rice_bits(indices))) if len(indices) else 0
    gaps = np.diff(indices, prepend=-1) - 1
    q, r = gaps >> k, gaps & ((1 << k) - 1)
    unary = np.ones(int(q.sum()) + len(q), dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    fixed = ((r[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return k, np.packbits(unary), np.packbits(fixed)


def rice_decode(quotients: np.ndarray, remainders: np.ndarray, *, nnz: int, k: int, numel: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`: the sorted flat indices ``[nnz]`` (int64), each in ``[0, numel)``.

    Raises ``ValueError`` when the streams do not hold exactly ``nnz`` positions below ``numel``."""
    if not 0 <= k <= MAX_K or not 0 <= nnz <= numel:
        raise ValueError(f"k={k} or nnz={nnz} out of range for {numel} weights")
    if len(remainders) != (nnz * k + 7) // 8:
        raise ValueError(f"{len(remainders)} remainder bytes, expected {(nnz * k + 7) // 8}")
    unary = np.unpackbits(quotients)
    ends = np.flatnonzero(unary == 0)[:nnz]
    used = int(ends[-1]) + 1 if nnz else 0
    if len(ends) != nnz or len(quotients) != (used + 7) // 8 or unary[used:].any():
        raise ValueError(f"the quotient stream ({len(quotients)} bytes) does not hold exactly {nnz} codes")
    q = np.diff(ends, prepend=-1) - 1
    bits = np.unpackbits(remainders)[: nnz * k].reshape(nnz, k).astype(np.int64)
    r = bits @ (1 << np.arange(k - 1, -1, -1, dtype=np.int64))
    indices = np.cumsum((q << k) + r + 1) - 1
    if nnz and indices[-1] >= numel:
        raise ValueError(f"a coded position ({int(indices[-1])}) lies beyond the layer's {numel} weights")
    return indices


# ---------------------------------------------------------------------------------------------------------------------
# Export and load.


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


def is_exported(path: str | Path) -> bool:
    """True for a file named ``*.sgt`` or one that starts like a safetensors file (a u64 length, then ``{``)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".sgt":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def read_exported(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and the dense state dict of an exported file; ``ConfigError`` for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ConfigError(f"{path}: not an sgtrain generator export (format {metadata.get('format')!r})")
            names = handle.keys()
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path}: unreadable generator export ({str(error).splitlines()[0]})") from None
    try:
        layers = json.loads(metadata["layers"])
        state = {name: tensor for name, tensor in tensors.items() if ":" not in name}
        for name, info in layers.items():
            shape = [int(d) for d in info["shape"]]
            numel = math.prod(shape)
            values = tensors.pop(f"{name}:values")
            quotients, remainders = tensors.pop(f"{name}:rice_q"), tensors.pop(f"{name}:rice_r")
            if values.dim() != 1 or values.numel() != int(info["nnz"]):
                raise ValueError(f"{name}: {values.numel()} values for {info['nnz']} positions")
            if quotients.dtype != torch.uint8 or remainders.dtype != torch.uint8:
                raise ValueError(f"{name}: position streams must be uint8")
            indices = rice_decode(
                quotients.numpy(), remainders.numpy(), nnz=int(info["nnz"]), k=int(info["k"]), numel=numel
            )
            dense = torch.zeros(numel, dtype=values.dtype)
            dense[torch.from_numpy(indices)] = values
            state[name] = dense.reshape(shape)
        leftover = [name for name in tensors if ":" in name]
        if leftover:
            raise ValueError(f"coded tensors without a layer entry: {leftover[:3]}")
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: inconsistent generator export ({error})") from None
    return metadata, state


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> LoadedGenerator:
    """The generator of an exported file (see :func:`export_generator`), in eval mode, ready to sample."""
    from sgtrain.train import build_models

    path = Path(path)
    metadata, state = read_exported(path)
    try:
        cfg = config_from_dict(json.loads(metadata["config"]))
        step = int(metadata["step"])
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"{path}: inconsistent generator export (config or step: {error})") from None
    # As load_generator: the weights come from the file, so build with the cheap init.
    G, _ = build_models(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="N02")))
    try:
        G.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path}: its tensors do not fit the generator of its config ({first})") from None
    return LoadedGenerator(G.to(device).eval().requires_grad_(False), cfg, step, path)
