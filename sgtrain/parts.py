"""The parts of a training run that the loop, the benchmarks and the tests build alike: networks, optimizers and mask
manager from the config; the latents of a step; the fixed noise of the sample grids."""

from __future__ import annotations

import torch
from torch import nn

from sgtrain.comm import Comm
from sgtrain.config import Config
from sgtrain.models.build import build_models
from sgtrain.sparse import MaskManager

SAMPLES_PER_CLASS = 8  # columns of a sample grid


def build_training(
    cfg: Config, device: torch.device | str = "cpu", *, comm: Comm | None = None, local_scores: bool = False
) -> tuple[nn.Module, nn.Module, torch.optim.Adam, torch.optim.Adam, MaskManager]:
    """G and D on ``device``, their Adam optimizers (BigGAN's betas and eps) and the mask manager (not initialized).

    ``comm`` and ``local_scores`` go to the mask manager (see :class:`MaskManager`)."""
    t = cfg.train
    G, D = build_models(cfg.model, cfg.seed)
    G, D = G.to(device), D.to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=t.g_lr, betas=tuple(t.betas), eps=t.adam_eps)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.d_lr, betas=tuple(t.betas), eps=t.adam_eps)
    masks = MaskManager(
        cfg.sparse,
        generator=G,
        discriminator=D,
        optimizers={"G": opt_g, "D": opt_d},
        total_steps=t.steps,
        seed=cfg.seed,
        comm=comm,
        local_scores=local_scores,
    )
    return G, D, opt_g, opt_d, masks


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The RNG for the latents of G step ``step``: a pure function of the two, so resumes are exact.

    It draws the latents of the global batch and each rank takes its own slice: rank r's latents are a pure function
    of (seed, rank, step) that does not depend on the number of ranks, so a run on N processes matches a run on one
    process with the same global batch (and can resume on a different number of processes).
    ``stream`` 1 is the augmentation's (``train.augment``), 2**62 seeds apart: turning augmentation on leaves the
    latents and the data order of a run as they were.
    """
    return torch.Generator().manual_seed(seed * 1_000_000_007 + step + stream * 2**62)


class StepLatents:
    """The latents of one iteration: each call draws the next global micro-batch ``(z [B, dim_z], y [B])`` from
    :func:`step_generator` and returns this rank's slice ``mine`` of it, on ``device``."""

    def __init__(self, cfg: Config, step: int, *, global_batch: int, mine: slice, device: torch.device) -> None:
        self.rng = step_generator(cfg.seed, step)
        self.cfg, self.global_batch, self.mine, self.device = cfg, global_batch, mine, device

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.model
        z = torch.randn(self.global_batch, m.dim_z, generator=self.rng)[self.mine]
        y = torch.randint(m.n_classes, (self.global_batch,), generator=self.rng)[self.mine]
        return z.to(self.device), y.to(self.device)


def sample_noise(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed latents ``[C*8, dim_z]`` and classes ``[C*8]`` of the sample grids: one row per class."""
    classes = cfg.train.sample_classes
    generator = torch.Generator().manual_seed(cfg.seed + 7919)
    z = torch.randn(classes * SAMPLES_PER_CLASS, cfg.model.dim_z, generator=generator)
    y = torch.arange(classes).repeat_interleave(SAMPLES_PER_CLASS)
    return z, y


def nonfinite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[1]`` int64: 1 if any floating-point tensor holds a NaN or Inf, else 0 (ready for an all-reduce "max").

    One fused max-|x| over the whole list (NaN and Inf survive a max) and one host sync, not one per tensor."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros(1, dtype=torch.int64)
    peak = torch.stack(torch._foreach_norm(floats, float("inf"))).float()
    return torch.tensor([0 if bool(torch.isfinite(peak).all()) else 1], dtype=torch.int64)
