"""How far a grown weight moves at its first Adam step, late in a run, in each optimizer-state mode.

The CIFAR-10 BigGAN of ``cifar10.yaml`` (G density 0.2, ERK, gradient growth; BigGAN's Adam with betas (0, 0.999))
trains ``warmup`` iterations to give Adam's moments real gradient statistics. Then Adam's step count of every weight
is set to ``adam_step - 1`` (about 60,000: half of the paper's 125k G steps) with each moment divided by its bias
correction at the warm-up's end, so that Adam reads back the same averages while its own correction is ~1, as late
in a long run. The next G step is a topology update (step ``adam_step``, drop fraction from the config's cosine);
one more iteration follows, and the ratio ``|first update of a grown weight| / lr`` is read off G's weights (a
grown weight is 0 before that step). The same ratio over the weights that stayed active shows what a warm weight's
step is in the same run.

Modes: ``dense`` (the authors': Adam sees dense gradients, a grown weight has warm moments), ``masked`` (inactive
gradients zeroed; a grown weight's second moment seeded, see ``sgtrain.sparse.topology.seed_second_moment``) and
``masked_zero`` (the masked mode before that fix: a grown weight's moments start at zero while the step count runs
on, so its first step is ``lr / sqrt(1 - b2)`` = 31.6 lr).

Usage::

    python -m sgtrain bench --suite grown                      # as part of the bench command
    python benchmarks/grown_weights.py [--warmup 30] [--batch 16] [--json out.json]

A benchmark of behaviour, not speed: the figures do not depend on the machine. tests/test_grown_weights.py asserts
that the dense and masked medians lie in [0.3, 3] and that masked_zero's does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sgtrain.benchmarks.harness import write_json
from sgtrain.benchmarks.sparse_overhead import build_run, train_iteration
from sgtrain.config import load_config

MODES = ("dense", "masked", "masked_zero")


@dataclass(kw_only=True)
class Settings:
    """The run before the update, and when the update comes."""

    warmup: int = 30  # training iterations before the update
    batch_size: int = 16  # global batch of the iterations
    adam_step: int = 60_000  # Adam's step count at the update
    seed: int = 0
    json: Path | None = None  # run() also writes the figures here


def _late_clock(optimizer: torch.optim.Adam, step: int) -> None:
    """Set every Adam slot's step count to ``step``, with each moment rescaled by its bias correction at its
    current count: ``m_hat`` and ``v_hat`` stay what they were, while Adam's own correction becomes ~1."""
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    for state in optimizer.state.values():
        t = float(state["step"])
        state["exp_avg"].div_(1 - beta1**t)
        state["exp_avg_sq"].div_(1 - beta2**t)
        state["step"].fill_(float(step))


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    return {"p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p90": float(q[4])}


def measure(
    mode: str,
    *,
    config: str = "cifar10.yaml",
    warmup: int = 30,
    batch_size: int = 16,
    adam_step: int = 60_000,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``|first Adam update| / lr`` of the weights G grows at an update at Adam step ``adam_step``, for ``mode``
    (one of :data:`MODES`): quantiles over grown weights, and over the weights kept active, as a dict."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    values: dict[str, Any] = {
        "seed": seed,
        "train.batch_size": batch_size,
        "train.d_steps": 1,  # the paper's 4 D steps would change D, not how Adam steps G's grown weights
        "sparse.optimizer_state": "dense" if mode == "dense" else "masked",
        **(overrides or {}),
    }
    cfg = load_config(config, values)
    run = build_run(cfg)
    if mode == "masked_zero":
        run.masks.grown_moments = "zero"
    update_every = run.masks.schedule.update_every
    if warmup >= update_every or adam_step % update_every:
        raise ValueError(f"warmup must be < update_every ({update_every}) and adam_step a multiple of it")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(warmup):
            train_iteration(run)
        # Late in a run: Adam's clock (and the run's step) jumps to just before an update step.
        for optimizer in (run.opt_g, run.opt_d):
            _late_clock(optimizer, adam_step - 1)
        run.step = run.masks.step = adam_step - 1
        layers = run.masks.layers["G"]
        old = {layer.name: layer.mask for layer in layers}  # masks are replaced at an update, never edited
        metrics = train_iteration(run, on_schedule=True)  # G step adam_step, then its topology update
        if not metrics:
            raise RuntimeError(f"no topology update at step {adam_step}")
        before = {layer.name: layer.param.detach().clone() for layer in layers}
        grown = {layer.name: layer.mask & ~old[layer.name] for layer in layers}
        kept = {layer.name: layer.mask & old[layer.name] for layer in layers}
        train_iteration(run)  # the first Adam step of the grown weights
    lr = cfg.train.g_lr
    grown_ratios, kept_ratios = [], []
    for layer in layers:
        delta = (layer.param.detach() - before[layer.name]).abs() / lr
        grown_ratios.append(delta[grown[layer.name]])
        kept_ratios.append(delta[kept[layer.name]])
    grown_all, kept_all = torch.cat(grown_ratios), torch.cat(kept_ratios)
    if grown_all.numel() == 0:
        raise RuntimeError("the update grew no weight")
    return {
        "mode": mode,
        "adam_step": adam_step,
        "drop_fraction": metrics["sparse/drop_fraction"],
        "grown": {"count": int(grown_all.numel()), **_quantiles(grown_all)},
        "kept": {"count": int(kept_all.numel()), **_quantiles(kept_all)},
    }


def run(settings: Settings) -> dict[str, Any]:
    """:func:`measure` for every mode, with the settings it ran with; also written to ``settings.json`` when set."""
    s = settings
    results = {
        mode: measure(mode, warmup=s.warmup, batch_size=s.batch_size, adam_step=s.adam_step, seed=s.seed)
        for mode in MODES
    }
    recorded = {"config": "cifar10.yaml", "warmup": s.warmup, "batch_size": s.batch_size, "adam_step": s.adam_step}
    result = {"settings": recorded, "modes": results}
    if settings.json is not None:
        write_json(settings.json, result)
    return result


def print_report(result: dict[str, Any]) -> None:
    """The table of a :func:`run` result, on stdout."""
    s = result["settings"]
    print(
        f"First Adam update of a grown G weight, |dw| / lr, {s['config']} at Adam step {s['adam_step']} "
        f"(warm-up {s['warmup']} iterations at batch {s['batch_size']})"
    )
    print(f"   {'mode':<13}{'grown median':>13}{'p10':>8}{'p90':>8}{'kept median':>13}{'grown':>8}")
    for mode, r in result["modes"].items():
        g, k = r["grown"], r["kept"]
        print(f"   {mode:<13}{g['median']:>13.3f}{g['p10']:>8.3f}{g['p90']:>8.3f}{k['median']:>13.3f}{g['count']:>8}")
