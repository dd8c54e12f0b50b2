"""Exponential moving average of the generator (BigGAN's G_ema)."""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_BUFFERS = ("average", "copy")


class EMA:
    """``ema = decay * ema + (1 - decay) * G`` for parameters; buffers averaged the same way, or copied.

    Before ``start`` the average is a plain copy of G (BigGAN starts averaging after the first, fast-moving
    phase of training). ``buffers="average"`` averages the floating-point buffers (batch-norm running statistics,
    spectral-norm vectors) with the weights, as BigGAN-PyTorch's ``utils.ema`` and the STU-GAN authors' do: it walks
    the whole state dict. Integer buffers (BN's ``num_batches_tracked``) are copied: a count has no average.
    ``buffers="copy"`` takes G's current buffers, statistics of G's own weights rather than of the averaged ones.
    """

    def __init__(self, source: nn.Module, *, decay: float, start: int, buffers: str = "average") -> None:
        if buffers not in EMA_BUFFERS:
            raise ValueError(f"buffers must be one of {EMA_BUFFERS}, got {buffers!r}")
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self.decay = decay
        self.start = start
        self.buffers = buffers

    @torch.no_grad()
    def update(self, source: nn.Module, step: int) -> None:
        """Fold ``source`` (unwrapped G) into the average after G step ``step``."""
        decay = self.decay if step >= self.start else 0.0
        for ema_p, p in zip(self.module.parameters(), source.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), source.buffers(), strict=True):
            if self.buffers == "average" and ema_b.is_floating_point():
                ema_b.lerp_(b, 1.0 - decay)
            else:
                ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
