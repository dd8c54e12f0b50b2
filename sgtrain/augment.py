"""Differentiable augmentation of every image D sees (DiffAugment, Zhao et al. 2020), off by default.

A discriminator trained on a small dataset learns its images by heart (1,797 digits are seen 50 times in a
3,000-step run) and is then satisfied by one good sample per class: G collapses within class. Augmenting the real
and the fake images alike, in D's steps and in G's, keeps D from memorising while leaving the distribution G learns
unchanged (the augmentation is applied to G's output, not to its target). Policies:

- ``translation``: each image shifted by up to 1/8 of its side in x and y, zero padded;
- ``cutout``: a square of half the side set to zero at a random place in each image.

The randomness of step ``s`` is a pure function of ``(seed, s)`` and of the global batch, so a resumed run draws what
the uninterrupted run drew and N ranks draw what one process draws for the same global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class StepAugment:
    """The augmentation of one iteration: each call draws the next global batch's parameters from ``rng`` (the
    step's ``step_generator(seed, step, stream=1)``) and transforms this rank's slice ``mine`` of it.
    ``x``: ``[B_local, C, H, W]`` -> the same shape. ``policies`` are checked by the config (train.augment)."""

    def __init__(self, policies: list[str], rng: torch.Generator, *, global_batch: int, mine: slice) -> None:
        self.rng, self.global_batch, self.mine = rng, global_batch, mine
        transforms = {"translation": self._translate, "cutout": self._cutout}
        self.transforms = [transforms[policy] for policy in policies]

    def _draw(self, low: int, high: int) -> torch.Tensor:
        """``[B_local]`` ints in [low, high], drawn for the whole global batch (the same stream on every rank)."""
        return torch.randint(low, high + 1, (self.global_batch,), generator=self.rng)[self.mine]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x

    def _translate(self, x: torch.Tensor) -> torch.Tensor:
        reach = max(1, x.shape[-1] // 8)
        dy, dx = self._draw(-reach, reach).to(x.device), self._draw(-reach, reach).to(x.device)
        return translate(x, dy, dx)

    def _cutout(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1] // 2
        top, left = self._draw(0, x.shape[-2] - side).to(x.device), self._draw(0, x.shape[-1] - side).to(x.device)
        return cutout(x, top, left, side)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Image i moved by ``(dy[i], dx[i])`` pixels, what moves in from outside zero: a gather, so gradients flow."""
    b, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None]).clamp(-1, h)  # [B, H]; -1 and h read padding
    cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None]).clamp(-1, w)
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None] + 1, cols[:, None, :] + 1].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: int) -> torch.Tensor:
    """Image i with the ``side`` x ``side`` square at ``(top[i], left[i])`` set to zero."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_r = (rows >= top[:, None]) & (rows < top[:, None] + side)  # [B, H]
    inside_c = (cols >= left[:, None]) & (cols < left[:, None] + side)
    keep = ~(inside_r[:, :, None] & inside_c[:, None, :])  # [B, H, W]
    return x * keep[:, None].to(x.dtype)
