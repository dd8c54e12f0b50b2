"""Samples from a run's EMA generator: truncation, eval mode or standing statistics, sharded over ranks.

Every sample has a global index, and its latent and class are a pure function of ``(seed, index)``: the images do
not depend on how many ranks generate them or in which batches, so a 2-rank evaluation scores the very images a
1-rank one does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sgtrain.config import ConfigError
from sgtrain.generators import LoadedGenerator, load_any


def truncated_normal(shape: Sequence[int], truncation: float | None, generator: torch.Generator) -> torch.Tensor:
    """Standard normal values; with ``truncation`` t, every value outside [-t, t] is drawn again until it falls
    inside (BigGAN's truncation trick: a truncated normal, not a rescaled one)."""
    z = torch.randn(tuple(shape), generator=generator)
    if truncation is None:
        return z
    if truncation <= 0:
        raise ConfigError(f"truncation must be > 0, got {truncation}")
    outside = z.abs() > truncation
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
        outside = z.abs() > truncation
    return z


def latents(
    indices: Sequence[int], *, dim_z: int, n_classes: int, seed: int, truncation: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[n, dim_z]`` and classes ``[n]`` of the samples with these global indices (a pure function)."""
    zs, ys = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        zs.append(truncated_normal((dim_z,), truncation, generator))
        ys.append(int(torch.randint(n_classes, (1,), generator=generator)))
    return torch.stack(zs), torch.tensor(ys, dtype=torch.int64)


@torch.no_grad()
def generate(
    G: nn.Module,
    indices: Sequence[int],
    *,
    dim_z: int,
    n_classes: int,
    seed: int,
    truncation: float | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 3, R, R]`` in [-1, 1] (on the CPU) and their classes, for the given global sample indices."""
    images, classes = [], []
    for start in range(0, len(indices), batch_size):
        z, y = latents(
            indices[start : start + batch_size], dim_z=dim_z, n_classes=n_classes, seed=seed, truncation=truncation
        )
        images.append(G(z.to(device), y.to(device)).float().cpu())
        classes.append(y)
    if not images:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(images), torch.cat(classes)


def rank_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The global sample indices one rank generates: a contiguous block, so gathering keeps the global order."""
    per_rank = -(-num_samples // world_size)
    return list(range(rank * per_rank, min(num_samples, (rank + 1) * per_rank)))


@torch.no_grad()
def standing_statistics(
    loaded: LoadedGenerator, *, batches: int = 16, batch_size: int = 64, seed: int = 0, truncation: float | None = None
) -> None:
    """BigGAN's "standing statistics": replace batch norm's running averages (a long EMA of training batches) by the
    exact average over ``batches`` fresh batches of samples at this truncation, then sample in eval mode."""
    G, m = loaded.module, loaded.cfg.model
    norms = [module for module in G.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = [module.momentum for module in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the standing batches
    G.train()
    for b in range(batches):
        indices = range(b * batch_size, (b + 1) * batch_size)
        z, y = latents(indices, dim_z=m.dim_z, n_classes=m.n_classes, seed=seed + 104_729, truncation=truncation)
        device = next(G.parameters()).device
        G(z.to(device), y.to(device))
    G.eval()
    for module, momentum in zip(norms, saved, strict=True):
        module.momentum = momentum
    loaded.mode = f"standing statistics ({batches} x {batch_size} samples)"


def class_grid(
    loaded: LoadedGenerator,
    *,
    classes: Sequence[int],
    per_class: int = 8,
    truncation: float | None = None,
    seed: int = 0,
    interpolate: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images ``[len(classes) * per_class, 3, R, R]``, one row per class: independent samples, or with
    ``interpolate`` a straight line in z from one sample to another (the class fixed along each row)."""
    m = loaded.cfg.model
    bad = [c for c in classes if not 0 <= c < m.n_classes]
    if bad:
        raise ConfigError(f"classes {bad} are out of range: the model has {m.n_classes} classes")
    rows = []
    for row, cls in enumerate(classes):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + row)
        if interpolate:
            ends = truncated_normal((2, m.dim_z), truncation, generator)
            weights = torch.linspace(0, 1, per_class)[:, None]
            z = torch.lerp(ends[0].expand(per_class, -1), ends[1].expand(per_class, -1), weights)
        else:
            z = truncated_normal((per_class, m.dim_z), truncation, generator)
        y = torch.full((per_class,), int(cls), dtype=torch.int64)
        with torch.no_grad():
            rows.append(loaded.module(z.to(device), y.to(device)).float().cpu())
    return torch.cat(rows)


def describe(loaded: LoadedGenerator, truncation: float | None) -> str:
    """One line stating what was sampled, to print with every result."""
    cut = f"truncation {truncation}" if truncation is not None else "no truncation"
    return f"EMA generator of {loaded.source} (step {loaded.step}), {loaded.mode}, {cut}"


def parse_classes(value: Any, n_classes: int) -> list[int]:
    """``--classes 1,3,5`` (fire may hand over an int, a tuple or a string) -> class indices; None: all classes."""
    if value is None:
        return list(range(n_classes))
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [int(item) for item in items if str(item).strip()]
    except ValueError:
        raise ConfigError(f"--classes must be class indices like 1,3,5, got {value!r}") from None


def sample_command(
    run: str,
    out: str,
    *,
    classes: Any = None,
    truncation: float | None = None,
    per_class: int = 8,
    interpolate: bool = False,
    standing: bool = False,
    seed: int = 0,
    print_line: Callable[[str], None] = print,
) -> None:
    """What ``python -m sgtrain sample`` does: a class-conditional grid (or interpolations) as one PNG.

    ``run`` is a run directory, a checkpoint file or a generator exported by ``sgtrain export`` (``--from G.sgt``)."""
    from sgtrain.images import save_grid

    loaded = load_any(run)
    if standing:
        standing_statistics(loaded, truncation=truncation, seed=seed)
    chosen = parse_classes(classes, loaded.cfg.model.n_classes)
    images = class_grid(
        loaded, classes=chosen, per_class=per_class, truncation=truncation, seed=seed, interpolate=interpolate
    )
    save_grid(images, out, nrow=per_class)
    kind = "interpolations" if interpolate else "samples"
    print_line(f"sgtrain: {out}: {len(chosen)} classes x {per_class} {kind}; {describe(loaded, truncation)}")
