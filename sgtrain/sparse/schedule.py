"""Schedules: when the topology changes and by how much (RigL), and the density of gradual magnitude pruning (GMP)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateSchedule:
    """When to run a drop-and-grow update and which fraction of each layer's active weights to swap.

    Steps count generator steps; ``update_end`` is a fraction of ``total_steps``.
    """

    update_every: int  # generator steps between topology updates (RigL's Delta T)
    update_end: float  # fraction of training after which the topology is frozen (RigL's T_end / T), in (0, 1]
    drop_fraction: float  # initial drop fraction alpha, in [0, 1)
    total_steps: int  # total generator steps of the run
    drop_fraction_min: float = 0.0  # the cosine's floor at update_end (the STU-GAN authors: 0.005; RigL: 0)

    def __post_init__(self) -> None:
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if not 0.0 < self.update_end <= 1.0:
            raise ValueError(f"update_end must be in (0, 1], got {self.update_end}")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if not 0.0 <= self.drop_fraction_min <= self.drop_fraction:
            raise ValueError(f"drop_fraction_min must be in [0, drop_fraction], got {self.drop_fraction_min}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    @property
    def end_step(self) -> float:
        """The last step at which an update may happen: ``update_end * total_steps``."""
        return self.update_end * self.total_steps

    def is_update_step(self, step: int) -> bool:
        """True on multiples of ``update_every`` in ``(0, update_end * total_steps]``.

        Step 0 is excluded: at init there is no gradient yet to grow from and the initial mask was just drawn.
        """
        return step > 0 and step % self.update_every == 0 and step <= self.end_step

    def drop_fraction_at(self, step: int) -> float:
        """Cosine-decayed drop fraction: ``min + (alpha - min)/2 * (1 + cos(pi * t / T_end))``.

        RigL's Eq. 1 (Evci et al. 2020) with a floor ``min``: the STU-GAN authors decay with PyTorch's
        ``CosineAnnealingLR(T_max=all G steps, eta_min=0.005)``, whose closed form this is. ``step`` is clamped to
        ``[0, T_end]``: past the end the cosine would climb back up, but no update runs there.
        """
        t = min(max(step, 0), self.end_step)
        span = self.drop_fraction - self.drop_fraction_min
        return self.drop_fraction_min + span / 2 * (1 + math.cos(math.pi * t / self.end_step))

    def update_index(self, step: int) -> int:
        """Index of the update at ``step`` (``step // update_every``), one of the integers seeding its RNG."""
        return step // self.update_every


def gmp_density(step: int, *, initial_density: float, final_density: float, start_step: int, end_step: int) -> float:
    """Density of gradual magnitude pruning at ``step`` (Zhu & Gupta 2017, Eq. 1).

    In sparsity ``s = 1 - density``: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for
    ``t0 <= t <= t1``; ``initial_density`` before ``t0`` and ``final_density`` after ``t1``. The cubic prunes fast
    while there are many redundant weights and slowly near the target, when each removal costs more.
    """
    for name, value in (("initial_density", initial_density), ("final_density", final_density)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be > start_step ({start_step})")
    if step <= start_step:
        return initial_density
    if step >= end_step:
        return final_density
    s_i, s_f = 1.0 - initial_density, 1.0 - final_density
    progress = (step - start_step) / (end_step - start_step)
    return 1.0 - (s_f + (s_i - s_f) * (1.0 - progress) ** 3)
