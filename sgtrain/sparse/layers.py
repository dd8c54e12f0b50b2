"""The masked layers of G and D: which weights are masked, each one's bookkeeping, and its checkpoint entry.

Model-agnostic: any ``nn.Module`` pair works. The convention is in :func:`masked_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sgtrain.config import ConfigError, SparseConfig
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.topology import pack_mask, unpack_mask

NETWORKS = ("G", "D")


def masked_parameters(module: nn.Module, targets: str) -> list[tuple[str, nn.Parameter]]:
    """The weights sparse training masks, in module order: conv (and, for ``conv_linear``, linear) weights.

    Embeddings, norm gains and biases stay dense (docs/design.md, "The sparse core"). A module with an attribute
    ``sparse_exempt = True`` (usually on its class) stays dense, and so does every module below it: BigGAN's
    class-conditional BN sets it, because its gain and bias projections are linear layers that produce norm gains.
    Any model marks its own modules the same way; nothing else about the model is assumed. Under spectral norm the
    masked tensor is the raw ``weight`` that SN normalises.
    """
    exempt = tuple(f"{name}." for name, m in module.named_modules() if getattr(m, "sparse_exempt", False))
    kinds = (nn.Conv2d, nn.Linear) if targets == "conv_linear" else (nn.Conv2d,)
    return [
        (name, m.weight)
        for name, m in module.named_modules()
        if isinstance(m, kinds) and not name.startswith(exempt) and not getattr(m, "sparse_exempt", False)
    ]


@dataclass
class Layer:
    """One masked weight tensor and its bookkeeping."""

    net: str  # "G" or "D"
    name: str  # qualified name in its network, e.g. "blocks.0.conv1"
    index: int  # position over G's then D's layers: one of the integers seeding this layer's RNG
    param: nn.Parameter
    density: float  # target density from the layer-wise distribution
    count: int  # active weights, constant over the run except under GMP / SNIP
    mask: torch.Tensor = field(repr=False)  # bool, the weight's shape and device
    union: torch.Tensor = field(repr=False)  # ITOP: every position ever active
    ema_mask: torch.Tensor | None = field(default=None, repr=False)  # the mask the EMA saw last (G only)
    score: torch.Tensor | None = field(default=None, repr=False)  # signed gradient (or momentum) for the next update
    owner: int = 0  # the rank that computes this layer's topology updates
    pending: torch.Tensor | None = field(default=None, repr=False)  # this step's dense gradient, summed in hooks

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "mask":
            # The per-step multiplies use a float copy: multiplying by a bool tensor makes a temporary float copy of
            # it on every call (CPU), which cost more than the multiply itself. Masks are replaced, never edited.
            super().__setattr__("fmask", value.to(self.param.dtype))

    @property
    def numel(self) -> int:
        return self.param.numel()


def build_layers(
    modules: dict[str, nn.Module], cfg: SparseConfig, targets: dict[str, float], *, start_dense: bool
) -> dict[str, list[Layer]]:
    """The masked layers of each network with all-ones masks, at the layer-wise densities of the ``targets`` overall
    densities (by network); counts at those densities, or at numel where the method ``start_dense``."""
    layers: dict[str, list[Layer]] = {}
    index = 0
    for net in NETWORKS:
        named = masked_parameters(modules[net], cfg.targets)
        shapes = {name: tuple(p.shape) for name, p in named}
        dense = {named[0][0], named[-1][0]} if cfg.dense_first_last else set()
        final = layer_densities(shapes, targets[net], kind=cfg.distribution, power=cfg.erk_power, dense=dense)
        counts = active_counts(shapes, {name: 1.0 for name in shapes} if start_dense else final)
        layers[net] = []
        for name, p in named:
            ones = torch.ones_like(p, dtype=torch.bool)
            layers[net].append(Layer(net, name, index, p, final[name], counts[name], mask=ones, union=ones.clone()))
            index += 1
    return layers


def layer_state(layer: Layer) -> dict[str, Any]:
    """A layer's checkpoint entry: mask, ITOP union and the EMA's view bit-packed (1 bit per weight), the count, and
    a dense tensor only for a score carried to the next update (momentum)."""
    entry: dict[str, Any] = {
        "mask": pack_mask(layer.mask.cpu()),
        "union": pack_mask(layer.union.cpu()),
        "count": layer.count,
    }
    if layer.ema_mask is not None:
        entry["ema_mask"] = pack_mask(layer.ema_mask.cpu())
    if layer.score is not None:
        entry["score"] = layer.score.cpu()
    return entry


def load_layer_state(layer: Layer, entry: dict[str, Any]) -> None:
    """Restore :func:`layer_state`'s ``entry`` into ``layer``, on its weight's device."""
    shape, device = layer.param.shape, layer.param.device
    layer.mask = unpack_mask(entry["mask"], shape).to(device)
    layer.union = unpack_mask(entry["union"], shape).to(device)
    layer.count = int(entry["count"])
    layer.ema_mask = unpack_mask(entry["ema_mask"], shape).to(device) if "ema_mask" in entry else None
    layer.score = entry["score"].to(device) if "score" in entry else None


def load_dense_weights(
    modules: dict[str, nn.Module], weights: dict[str, dict[str, torch.Tensor]], *, source: Any
) -> None:
    """Load a dense run's state dicts (``weights[net]``) into ``modules[net]``; a ConfigError names the network that
    ``source`` (the configured ``sparse.prune_from``) does not hold."""
    for net in NETWORKS:
        try:
            modules[net].load_state_dict(weights[net])
        except (KeyError, RuntimeError) as error:
            raise ConfigError(f"sparse.prune_from: {source} does not hold this model's {net} ({error})") from None
