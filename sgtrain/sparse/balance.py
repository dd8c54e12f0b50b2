"""ADAPT's balance ratio and its density rule (Wang et al., "Balanced Training for Sparse GANs", NeurIPS 2023).

The balance ratio of one G step measures how far it moved D's scores of fakes towards the reals::

    BR = (E[D(G_after(z))] - E[D(G_before(z))]) / (E[D(x)] - E[D(G_before(z))])

with the same ``z`` before and after the step and D as it is after its own steps. It is sampled every few iterations
and averaged over a window; every D update interval the window's ratio moves D's density by a step: up above the
upper bound (D too weak), down below the lower one (D too strong). ``YiteWang/ADAPT`` (``sparselearning/core.py``,
``dynamic_adjust_density``; ``gan_functions.py``) is the reference; docs/adapt_reference.md describes it.

Unlike the authors' code, every term here is a mean over the global batch (the ranks' sums all-reduced), so every
rank holds the same window and takes the same decision, and densities are kept on a grid of the step so that the
strict cap is reached exactly (their float equality test needs one extra step to get there).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from sgtrain.comm import Comm

GROW, SHRINK, EXPLORE, HOLD = "grow", "shrink", "explore", "hold"


def global_means(real_logits: torch.Tensor, before: torch.Tensor, after: torch.Tensor, comm: Comm) -> torch.Tensor:
    """``[3]`` float64: the means over the global batch of D's logits of the real images, of the fakes before the G
    step and of the same latents' fakes after it. Each rank passes its own logits (any shape); one all-reduce."""
    sums = torch.stack([real_logits.double().sum(), before.double().sum(), after.double().sum()])
    counts = torch.tensor([real_logits.numel(), before.numel(), after.numel()], dtype=torch.float64)
    total = comm.all_reduce(torch.cat([sums.cpu(), counts]), "sum")
    return total[:3] / total[3:]


def balance_ratios(samples: torch.Tensor) -> torch.Tensor:
    """``[n]``: the balance ratio of each sample row ``(real, before, after)`` of ``samples`` ``[n, 3]``."""
    real, before, after = samples.unbind(1)
    return (after - before) / (real - before)


class BalanceWindow:
    """The latest ``size`` samples of the balance-ratio terms (global means), and their ratio.

    The ratio is the mean of the per-sample ratios, as the authors compute it (not the ratio of mean terms). It is
    None until the window is full, so no decision rests on a partial window."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a balance-ratio window holds at least one sample, got {size}")
        self.size = size
        self.samples: deque[torch.Tensor] = deque(maxlen=size)

    def add(self, sample: torch.Tensor) -> None:
        """Append one ``[3]`` sample ``(real, before, after)``; the oldest falls out of a full window."""
        self.samples.append(sample.detach().to(torch.float64).reshape(3).cpu())

    def ratio(self) -> float | None:
        """The mean ratio of a full window (None before: no decision rests on a partial window)."""
        if len(self.samples) < self.size:
            return None
        return self.mean()

    def mean(self) -> float | None:
        """The mean ratio of the samples so far (None: no sample yet), for the logs."""
        if not self.samples:
            return None
        return float(balance_ratios(torch.stack(list(self.samples))).mean())

    def state_dict(self) -> dict[str, Any]:
        """The samples ``[n, 3]`` (float64, oldest first): a resume continues the very same window."""
        rows = torch.stack(list(self.samples)) if self.samples else torch.empty(0, 3, dtype=torch.float64)
        return {"size": self.size, "samples": rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"the checkpoint's balance window holds {state['size']} samples, this run {self.size}")
        self.samples = deque((row.clone() for row in state["samples"]), maxlen=self.size)


def next_density(
    density: float,
    ratio: float,
    *,
    lower: float,
    upper: float,
    step: float,
    minimum: float,
    cap: float,
    explore_at_cap: bool,
) -> tuple[float, str]:
    """D's density after a decision, and the decision: :data:`GROW`, :data:`SHRINK`, :data:`EXPLORE` (strict ADAPT
    at its cap: drop and grow at fixed density) or :data:`HOLD`.

    ``ratio >= upper``: D is too weak, its density grows by ``step`` up to ``cap``; ``ratio <= lower``: too strong,
    it shrinks by ``step`` down to ``minimum``. Results are rounded to 12 decimals so that a density stepped from
    0.3 by 0.05 lands on 0.5 exactly."""
    if ratio >= upper:
        if density < cap - 1e-9:
            return round(min(density + step, cap), 12), GROW
        return density, EXPLORE if explore_at_cap else HOLD
    if ratio <= lower and density > minimum + 1e-9:
        return round(max(density - step, minimum), 12), SHRINK
    return density, HOLD
