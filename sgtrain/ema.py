"""Exponential moving average of the generator (BigGAN's G_ema)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * G`` for parameters, a copy for buffers.

    Before ``start`` the average is a plain copy of G (BigGAN starts averaging after the first, fast-moving
    phase of training). Buffers (BatchNorm running statistics, spectral-norm vectors) are copied rather than
    averaged: they are statistics of G's current weights, not parameters.
    """

    def __init__(self, source: nn.Module, *, decay: float, start: int) -> None:
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self.decay = decay
        self.start = start

    @torch.no_grad()
    def update(self, source: nn.Module, step: int) -> None:
        """Fold ``source`` (unwrapped G) into the average after G step ``step``."""
        decay = self.decay if step >= self.start else 0.0
        for ema_p, p in zip(self.module.parameters(), source.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), source.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
