"""Sparse-to-sparse training. The training loop talks to one object with the interface of :class:`DenseTraining`."""

from __future__ import annotations

from typing import Any

from torch import nn

from sgtrain.config import SparseConfig


class DenseTraining:
    """``sparse.method: dense``: every weight active, so the mask hooks have nothing to do.

    The loop calls ``before_step(net)`` between backward and the optimizer step (gradient masking and grow scores
    for sparse methods), ``after_step(net)`` after it (re-masking), and ``maybe_update(step)`` after each G step
    (topology updates); the manager joins checkpoints through ``state_dict``/``load_state_dict``.
    """

    def before_step(self, net: str) -> None:
        pass

    def after_step(self, net: str) -> None:
        pass

    def maybe_update(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_mask_manager(cfg: SparseConfig, generator: nn.Module, discriminator: nn.Module) -> DenseTraining:
    """The mask manager for ``cfg.method`` over the unwrapped G and D."""
    if cfg.method == "dense":
        return DenseTraining()
    raise ValueError(f"unknown sparse.method {cfg.method!r}")
