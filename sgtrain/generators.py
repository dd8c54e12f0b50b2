"""A trained generator, ready to sample: from a run directory, a checkpoint file or a file ``sgtrain export`` wrote.

Sampling, evaluation and export read generators through this module; none of them imports the training loop.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sgtrain import checkpoint
from sgtrain.codec import FORMAT, rice_decode
from sgtrain.config import Config, ConfigError, config_from_dict
from sgtrain.models.build import build_models


@dataclass
class LoadedGenerator:
    """A run's EMA generator, ready to sample (eval mode), and where it came from."""

    module: nn.Module
    cfg: Config
    step: int
    source: Path
    mode: str = "eval mode (running statistics)"  # how batch norm normalises: stated with every result


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> LoadedGenerator:
    """The EMA generator of a run directory's latest checkpoint, or of one checkpoint file."""
    source, state = checkpoint.load_run_or_file(path)
    cfg = config_from_dict(state["config"])
    G, _ = build_models(cfg.model, cfg.seed, weights_follow=True)
    G.load_state_dict(state["ema"])
    return LoadedGenerator(G.to(device).eval().requires_grad_(False), cfg, int(state["step"]), source)


def load_any(path: str | Path, device: torch.device | str = "cpu") -> LoadedGenerator:
    """A run directory or checkpoint (:func:`load_generator`), or a file written by ``sgtrain export``."""
    return load_exported(path, device) if is_exported(path) else load_generator(path, device)


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
    """The generator of a file :func:`sgtrain.export.export_generator` wrote, in eval mode, ready to sample."""
    path = Path(path)
    metadata, state = read_exported(path)
    try:
        cfg = config_from_dict(json.loads(metadata["config"]))
        step = int(metadata["step"])
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"{path}: inconsistent generator export (config or step: {error})") from None
    G, _ = build_models(cfg.model, cfg.seed, weights_follow=True)
    try:
        G.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path}: its tensors do not fit the generator of its config ({first})") from None
    return LoadedGenerator(G.to(device).eval().requires_grad_(False), cfg, step, path)
