"""What sparse training costs on top of dense training, measured on this machine's CPU.

Three measurements, each printed as a table (and written to JSON with ``--json``):

1. **Sparse vs dense training iteration** of the CIFAR-10 BigGAN (``cifar10.yaml``: G density 0.2, D density 0.5,
   against ``cifar10_dense.yaml``). One iteration is ``d_steps`` D steps and one G step exactly as in
   ``sgtrain/train.py`` (masking, EMA, ``maybe_update``), between topology updates. Dense and sparse iterations are
   interleaved so that drift in the machine's speed hits both alike.
2. **Mask enforcement alone**: ``before_step``/``after_step`` of G and D against a naive state-dict round trip
   (copy the whole ``state_dict``, multiply the masked weights in the copy, ``load_state_dict`` it back; the same
   for the gradients).
3. **Topology update vs a training iteration** of the ImageNet-128 BigGAN: one ``maybe_update`` at an update step
   with G (gradient growth) and D (random growth) both exploring, against a training iteration measured at a small
   batch and extrapolated, clearly labelled, to the config's global batch.

``sgtrain bench --suite balance`` also runs :func:`bench_balance`, which is not part of this script's run: what
ADAPT's balance-ratio sampling (``sparse.method: adapt``) adds to a CIFAR-10 training iteration.

The masks are dense bool tensors multiplied into dense weights, so sparse training costs the dense FLOPs plus the
masking: the overhead measured here is that of the masks, not a speed-up from sparsity.

Usage (from the repository root)::

    python benchmarks/sparse_overhead.py                                # default, ~10 minutes on 2 CPU cores
    python benchmarks/sparse_overhead.py --quick                        # fewer repeats, ~3 minutes
    python benchmarks/sparse_overhead.py --batch 50 --d-steps 4         # the paper's full CIFAR-10 iteration
    python benchmarks/sparse_overhead.py --json results.json            # also write every figure as JSON

This is a benchmark: it prints figures and never asserts timings. It does check that what it times is what it
claims (same initial weights, really sparse masks, both networks changed by the update) and stops otherwise.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgtrain.benchmarks.harness import load_avg, machine, median_iqr, progress, timed, write_json
from sgtrain.config import Config, load_config
from sgtrain.ema import EMA
from sgtrain.flops import config_flops, format_flops
from sgtrain.models import Discriminator, Generator
from sgtrain.models.build import build_models
from sgtrain.parts import build_training, step_generator
from sgtrain.sparse import MaskManager
from sgtrain.step import GanStep, LocalNetwork

THREADS = 2  # the benchmark machine's cores; fixed so that figures from different machines compare like for like
NETWORKS = ("G", "D")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(kw_only=True)
class Settings:
    """What to measure. The repeat counts left None follow ``quick``; they are sized so that the default run takes
    ~10 minutes on 2 cores and a quick one ~3."""

    json: Path | None = None  # run() also writes every figure here
    repeats: int | None = None  # timed CIFAR-10 iterations per side (40, quick 8)
    batch: int = 8  # CIFAR-10 batch (paper: 50; 8 to fit a CPU)
    d_steps: int = 1  # D steps per G step (paper: 4)
    quick: bool = False  # fewer repeats everywhere
    device: str = dataclasses.field(default_factory=default_device)  # the iteration's device
    warmup: int | None = None  # untimed iterations per side before the timed ones (3, quick 2)
    enforce_repeats: int | None = None  # timed rounds of mask enforcement (60, quick 20)
    update_repeats: int | None = None  # timed ImageNet-128 topology updates (3, quick 1)
    imagenet_batches: list[int] | None = None  # batches of the timed ImageNet-128 iterations ([2, 8], quick [2, 4])
    imagenet_repeats: int | None = None  # timed ImageNet-128 iterations per batch (3, quick 1)
    # bench_balance: timed blocks of sparse.adapt.sample_every iterations per side (12, quick 6; even, so that each
    # side runs first equally often)
    balance_repeats: int | None = None

    def __post_init__(self) -> None:
        if self.batch < 1 or self.d_steps < 1:
            raise ValueError("--batch and --d-steps must be >= 1")
        quick = self.quick
        self.repeats = self.repeats or (8 if quick else 40)  # 0 too means the default, as on the command line
        if self.warmup is None:
            self.warmup = 2 if quick else 3
        if self.enforce_repeats is None:
            self.enforce_repeats = 20 if quick else 60
        if self.update_repeats is None:
            self.update_repeats = 1 if quick else 3
        if self.imagenet_batches is None:
            self.imagenet_batches = [2, 4] if quick else [2, 8]
        if self.imagenet_repeats is None:
            self.imagenet_repeats = 1 if quick else 3
        if self.balance_repeats is None:
            self.balance_repeats = 6 if quick else 12
        if self.repeats < 1 or self.balance_repeats < 1:
            raise ValueError("--repeats and balance_repeats must be >= 1")


# --------------------------------------------------------------------------------------------------------------------
# Table cells.


def fmt_time(seconds: float) -> str:
    """Seconds in the unit that keeps three significant digits readable: ``0.0123 -> "12.3 ms"`` (a difference of
    timings may be negative: ``-0.0123 -> "-12.3 ms"``)."""
    if abs(seconds) >= 1.0:
        return f"{seconds:.2f} s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def stat_row(label: str, stats: dict[str, Any]) -> str:
    """One table row: label, median, IQR and number of timings of a :func:`median_iqr`."""
    return f"   {label:<42}{fmt_time(stats['median_s']):>10}  IQR {fmt_time(stats['iqr_s'])}  n {stats['n']}"


# --------------------------------------------------------------------------------------------------------------------
# One training run in memory: models, optimizers, masks, EMA and a fixed batch of "real" images.


@dataclass
class Run:
    cfg: Config
    G: Generator
    D: Discriminator
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    masks: MaskManager
    ema: EMA
    real: torch.Tensor  # [B, 3, R, R] in [-1, 1]: stands in for a data batch (the data pipeline is not timed)
    y_real: torch.Tensor  # [B]
    step: int = 0  # completed G steps


def build_run(cfg: Config, device: torch.device | str = "cpu") -> Run:
    """Set up a run as ``training_loop`` does for a fresh start on one process (no DDP wrapper, no data stream)."""
    t = cfg.train
    G, D, opt_g, opt_d, masks = build_training(cfg, device)
    masks.initialize()
    ema = EMA(G, decay=t.ema_decay, start=t.ema_start, buffers=t.ema_buffers)
    # Fixed, seeded images: dense and sparse runs see the same "data".
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    side, batch = cfg.model.resolution, t.batch_size
    real = torch.rand(batch, 3, side, side, generator=generator) * 2 - 1
    y_real = torch.randint(cfg.model.n_classes, (batch,), generator=generator)
    return Run(cfg, G, D, opt_g, opt_d, masks, ema, real.to(device), y_real.to(device))


def train_iteration(run: Run, *, on_schedule: bool = False, balance_every: int | None = None) -> dict[str, float]:
    """One G iteration, :class:`sgtrain.step.GanStep` as the loop runs it: ``d_steps`` D steps, one G step, EMA,
    ``maybe_update``. Single process, no accumulation and no autocast. The step is advanced past update steps, to
    measure the steady state between topology updates; ``on_schedule`` takes the next step as it comes, update or
    not. ``balance_every`` is ``GanStep``'s (None: the method's balance-ratio sampling, ADAPT's; 0: none). Returns
    ``maybe_update``'s metrics.
    """
    cfg, masks, micro = run.cfg, run.masks, run.cfg.train.batch_size
    step = run.step + 1
    while not on_schedule and masks.schedule.is_update_step(step):
        step += 1
    rng = step_generator(cfg.seed, step)  # the same latents for the dense and the sparse run at this step

    def latents() -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(micro, cfg.model.dim_z, generator=rng)
        y = torch.randint(cfg.model.n_classes, (micro,), generator=rng)
        return z.to(run.real.device), y.to(run.real.device)

    # The training loop's own iteration (D steps on a fixed real batch, G step, EMA, topology update), in one
    # process: its topology update is never due here unless on_schedule (see above).
    gan = GanStep(
        G=LocalNetwork(run.G, run.opt_g),
        D=LocalNetwork(run.D, run.opt_d),
        masks=masks,
        ema=run.ema,
        d_steps=cfg.train.d_steps,
        balance_every=balance_every,
    )
    metrics = gan(step - 1, lambda: (run.real, run.y_real), latents).topology
    if metrics and not on_schedule:
        raise RuntimeError(f"step {step} ran a topology update; this benchmark times the steps between them")
    run.step = step
    return metrics


def check_same_init(a: Config, b: Config) -> None:
    """Stop unless two configs build bit-identical G and D: dense and sparse must start from the same weights."""
    (g_a, d_a), (g_b, d_b) = build_models(a.model, a.seed), build_models(b.model, b.seed)
    for x, y in ((g_a, g_b), (d_a, d_b)):
        for (name, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items(), strict=True):
            if not torch.equal(p, q):
                raise RuntimeError(f"dense and sparse runs start from different weights ({name})")


def density(masks: MaskManager, net: str) -> float:
    """Measured fraction of non-zero masked weights of ``net`` (1.0 for a dense run, which masks nothing)."""
    layers = masks.layers[net]
    if not layers:
        return 1.0
    return sum(int(layer.param.count_nonzero()) for layer in layers) / sum(layer.numel for layer in layers)


def fill_fake_grads(module: nn.Module, generator: torch.Generator) -> None:
    """Dense random gradients in every parameter's ``.grad``, as a backward pass leaves them (values do not matter)."""
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


# --------------------------------------------------------------------------------------------------------------------
# 1. Sparse vs dense training iteration (CIFAR-10).


def bench_iteration(settings: Settings, config: str = "cifar10.yaml") -> dict[str, Any]:
    """A training iteration of ``config``, dense vs its sparse method, interleaved (``sgtrain bench --suite step``
    runs it for each model config)."""
    overrides = {"train.batch_size": settings.batch, "train.d_steps": settings.d_steps}
    cfg_sparse = load_config(config, overrides)
    dense = {"sparse.method": "dense", "sparse.density_g": 1.0, "sparse.density_d": 1.0}  # as cifar10_dense.yaml
    cfg_dense = load_config(config, {**overrides, **dense})
    check_same_init(cfg_sparse, cfg_dense)
    runs = {"dense": build_run(cfg_dense, settings.device), "sparse": build_run(cfg_sparse, settings.device)}
    densities = {name: {net: density(run.masks, net) for net in NETWORKS} for name, run in runs.items()}
    if densities["sparse"]["G"] > 0.5 or densities["dense"]["G"] < 1.0:
        raise RuntimeError(f"the sparse run is not sparse or the dense run not dense: {densities}")
    flops = config_flops(cfg_sparse)["train_iteration"]

    progress(f"{config} iteration: warm-up {settings.warmup} + {settings.repeats} interleaved rounds")
    for _ in range(settings.warmup):  # first steps allocate Adam's state and warm the allocator's caches
        for run in runs.values():
            train_iteration(run)
    gc.collect()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for i in range(settings.repeats):
        # ABAB... with the order flipped every round, so neither side always runs on the other's warm caches.
        order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
        for name in order:
            times[name].append(timed(lambda run=runs[name]: train_iteration(run)))
    stats = {name: median_iqr(values) for name, values in times.items()}
    ratios = [s / d for s, d in zip(times["sparse"], times["dense"], strict=True)]
    return {
        "config": f"{config} vs the same with sparse.method=dense",
        "device": str(settings.device),
        "batch_size": settings.batch,
        "d_steps": settings.d_steps,
        "measured_density": densities,
        "dense_iteration_flops": flops["dense"],
        "dense": stats["dense"],
        "sparse": stats["sparse"],
        "overhead_pct": 100 * (stats["sparse"]["median_s"] / stats["dense"]["median_s"] - 1),
        # The median of per-round ratios: robust to the machine drifting between rounds.
        "overhead_paired_pct": 100 * (statistics.median(ratios) - 1),
    }


# --------------------------------------------------------------------------------------------------------------------
# 2. Mask enforcement alone (CIFAR-10 G and D).


def naive_mask_grads(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Gradients through a dict round trip: copy every gradient, multiply the masked ones, copy them all back."""
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    for name, mask in masks.items():
        grads[name] = grads[name] * mask
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.grad is not None:
                p.grad.copy_(grads[name])


def naive_mask_weights(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Weights through a state-dict round trip: copy the whole state_dict, multiply the masked weights, load it back."""
    state = {key: value.clone() for key, value in module.state_dict().items()}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    module.load_state_dict(state)


def bench_enforcement(settings: Settings) -> dict[str, Any]:
    # Masked mode: gradients and weights are both masked (the authors' dense mode masks the weights only: half this).
    overrides = {
        "train.batch_size": settings.batch,
        "train.d_steps": settings.d_steps,
        "sparse.optimizer_state": "masked",
    }
    cfg = load_config("cifar10.yaml", overrides)
    run = build_run(cfg)
    masks, modules = run.masks, {"G": run.G, "D": run.D}
    if masks.schedule.is_update_step(masks.step + 1):
        raise RuntimeError("before_step would capture grow scores here; pick a step between updates")
    by_name = {net: {f"{layer.name}.weight": layer.mask for layer in masks.layers[net]} for net in NETWORKS}
    generator = torch.Generator().manual_seed(0)
    for module in modules.values():
        fill_fake_grads(module, generator)

    def manager() -> None:
        for net in NETWORKS:
            masks.before_step(net)
            masks.after_step(net)

    def naive() -> None:
        for net in NETWORKS:
            naive_mask_grads(modules[net], by_name[net])
            naive_mask_weights(modules[net], by_name[net])

    # Both must leave the same tensors: refill the gradients, run one, snapshot, refill, run the other, compare.
    results = []
    for fn in (manager, naive):
        for module in modules.values():
            fill_fake_grads(module, torch.Generator().manual_seed(1))
        fn()
        results.append([t.clone() for m in modules.values() for p in m.parameters() for t in (p, p.grad)])
    if not all(torch.equal(a, b) for a, b in zip(*results, strict=True)):
        raise RuntimeError("the naive masking and the manager's masking disagree")

    progress(f"mask enforcement: {settings.enforce_repeats} interleaved rounds")
    for _ in range(3):
        manager()
        naive()
    gc.collect()
    times: dict[str, list[float]] = {"manager": [], "naive": []}
    for i in range(settings.enforce_repeats):
        order = (("manager", manager), ("naive", naive))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(fn))
    stats = {name: median_iqr(values) for name, values in times.items()}
    masked = sum(layer.numel for net in NETWORKS for layer in masks.layers[net])
    total = sum(p.numel() for m in modules.values() for p in m.parameters())
    return {
        "config": "cifar10.yaml",
        "calls": "before_step(G) + after_step(G) + before_step(D) + after_step(D)",
        "masked_weights": masked,
        "parameters": total,
        "manager": stats["manager"],
        "naive_state_dict": stats["naive"],
        "speedup": stats["naive"]["median_s"] / stats["manager"]["median_s"],
    }


# --------------------------------------------------------------------------------------------------------------------
# 3. Topology update vs a training iteration (ImageNet-128).

# N(0, 0.02) builds in a fraction of ortho's time (a QR per layer of a 158M-parameter model) and leaves every timed
# operation unchanged: the update's cost depends on shapes and counts, not on the weights' values.
IMAGENET_OVERRIDES = {"model.init": "N02"}


def bench_topology(settings: Settings) -> dict[str, Any]:
    cfg = load_config(
        "imagenet128.yaml",
        {**IMAGENET_OVERRIDES, "sparse.explore": "GD", "sparse.grow_g": "gradient", "sparse.grow_d": "random"},
    )
    progress("ImageNet-128 topology update: building G and D")
    G, D = build_models(cfg.model, cfg.seed)
    optimizers = {
        "G": torch.optim.Adam(G.parameters(), lr=cfg.train.g_lr, betas=tuple(cfg.train.betas)),
        "D": torch.optim.Adam(D.parameters(), lr=cfg.train.d_lr, betas=tuple(cfg.train.betas)),
    }
    masks = MaskManager(
        cfg.sparse, generator=G, discriminator=D, optimizers=optimizers, total_steps=cfg.train.steps, seed=cfg.seed
    )
    masks.initialize()
    modules = {"G": G, "D": D}
    generator = torch.Generator().manual_seed(0)
    # One masked optimizer step so that Adam holds its moments: the update clears them for every swapped weight.
    for net in NETWORKS:
        fill_fake_grads(modules[net], generator)
        masks.before_step(net)
        optimizers[net].step()
        masks.after_step(net)

    every = cfg.sparse.update_every
    capture, update, changes = [], [], []
    for i in range(settings.update_repeats):
        step = (i + 1) * every
        progress(f"ImageNet-128 topology update {i + 1}/{settings.update_repeats} at G step {step}")
        for module in modules.values():
            fill_fake_grads(module, generator)
        masks.step = step - 1  # as after G step ``step - 1``: the coming G step's before_step reads the scores
        if not masks.schedule.is_update_step(masks.step + 1):
            raise RuntimeError(f"step {step} is not an update step of the schedule")
        gc.collect()
        # D's before_step comes first in an iteration; only G reads scores (gradient growth), D grows at random.
        start = time.perf_counter()
        for net in ("D", "G"):
            masks.before_step(net)
        capture.append(time.perf_counter() - start)
        before = {net: [layer.mask.clone() for layer in masks.layers[net]] for net in NETWORKS}
        start = time.perf_counter()
        metrics = masks.maybe_update(step)
        update.append(time.perf_counter() - start)
        for net in NETWORKS:
            if all(torch.equal(a, layer.mask) for a, layer in zip(before[net], masks.layers[net], strict=True)):
                raise RuntimeError(f"the update at step {step} left {net}'s masks unchanged")
        changes.append(metrics)
    weights = {net: sum(layer.numel for layer in masks.layers[net]) for net in NETWORKS}
    return {
        "config": "imagenet128.yaml, model.init=N02, sparse.explore=GD (G gradient growth, D random growth)",
        "masked_weights": weights,
        "drop_fraction": changes[0].get("sparse/drop_fraction"),
        "metrics": changes,
        "score_capture": median_iqr(capture),
        "maybe_update": median_iqr(update),
    }


def bench_imagenet_iteration(settings: Settings, global_batch_update: float) -> dict[str, Any]:
    """A sparse ImageNet-128 iteration at two small batches, extrapolated to the config's global batch."""
    base = load_config("imagenet128.yaml", IMAGENET_OVERRIDES)
    global_batch = base.train.batch_size
    batches = sorted(set(settings.imagenet_batches))
    times: dict[int, dict[str, Any]] = {}
    for batch in batches:
        cfg = load_config(
            "imagenet128.yaml",
            {**IMAGENET_OVERRIDES, "train.batch_size": batch, "train.accumulation": 1, "train.d_steps": 1},
        )
        progress(f"ImageNet-128 iteration at batch {batch}: building")
        run = build_run(cfg)
        progress(f"ImageNet-128 iteration at batch {batch}: warm-up 1 + {settings.imagenet_repeats} timed")
        train_iteration(run)
        gc.collect()
        times[batch] = median_iqr(
            [timed(lambda run=run: train_iteration(run)) for _ in range(settings.imagenet_repeats)]
        )
        del run
        gc.collect()
    flops_per_image = config_flops(base)["train_iteration"]["dense"] / global_batch
    out: dict[str, Any] = {
        "config": "imagenet128.yaml (sparse STU: G 0.2 / D 0.3), model.init=N02, accumulation 1, d_steps 1",
        "global_batch": global_batch,
        "measured": {str(b): times[b] for b in batches},
        "dense_flops_per_image": flops_per_image,
    }
    small = batches[0]
    t_small = times[small]["median_s"]
    # Proportional: every second of the small iteration scales with the batch, fixed costs (optimizer step, SN power
    # iterations, masking, EMA) included, so it overstates the big iteration and understates the update's share.
    out["extrapolated_proportional_s"] = t_small * global_batch / small
    if len(batches) >= 2:
        # Linear fit through the smallest and largest batch: a fixed part plus a per-image part, the FLOPs' shape.
        large = batches[-1]
        per_image = (times[large]["median_s"] - t_small) / (large - small)
        fixed = t_small - per_image * small
        out["fit_fixed_s"] = fixed
        out["fit_per_image_s"] = per_image
        out["extrapolated_linear_s"] = fixed + per_image * global_batch
    best = out.get("extrapolated_linear_s", out["extrapolated_proportional_s"])
    out["extrapolated_s"] = best
    out["update_vs_iteration"] = global_batch_update / best
    every = base.sparse.update_every
    out["update_every"] = every
    out["amortized_update_pct"] = 100 * global_batch_update / (every * best)
    return out


# --------------------------------------------------------------------------------------------------------------------
# 4. ADAPT's balance-ratio sampling per iteration (CIFAR-10; `sgtrain bench --suite balance`).

# ADAPT as the authors' relax script runs it (cifar10_adapt.yaml: G 0.1 / D 0.1, a sample every 10 iterations).
# Both of its other intervals are longer than any measurement (and than the run, so G's schedule ends first): no
# topology update of G and no density decision of D falls among the timed steps, and the two sides differ by the
# balance-ratio sampling alone. The settings' batch and D steps replace the config's (5 D steps: at 1, the default,
# the sampling's share of an iteration is the largest it can be).
QUIET_INTERVAL = 10**6
BALANCE_OVERRIDES = {  # (the relax recipe's method and densities again, for the digits config of --tiny)
    "sparse.method": "adapt",
    "sparse.adapt.variant": "relax",
    "sparse.density_g": 0.1,
    "sparse.density_d": 0.1,
    "sparse.update_every": QUIET_INTERVAL,
    "sparse.adapt.update_every": QUIET_INTERVAL,
}


def bench_balance(settings: Settings, config: str = "cifar10_adapt.yaml") -> dict[str, Any]:
    """ADAPT's balance-ratio sampling: the mean time of a training iteration of one run with a sample every
    ``sparse.adapt.sample_every`` iterations (after the G step one G forward on its latents, one D forward over the
    last real batch and those fakes, one all-reduce of 6 numbers) against the same run with ``balance_every=0``.

    Both sides are timed in blocks of ``sample_every`` iterations, so that each sampling block holds exactly one
    sample (its last iteration); blocks alternate between the sides, the order flipped every round, as
    :func:`bench_iteration` interleaves dense and sparse. A sample's own cost is measured directly as well: in each
    sampling block, its sampling iteration minus the median of its other iterations. Divided by ``sample_every``
    it should match the overhead of the whole blocks."""
    overrides = {"train.batch_size": settings.batch, "train.d_steps": settings.d_steps, **BALANCE_OVERRIDES}
    cfg = load_config(config, overrides)
    run = build_run(cfg, settings.device)
    every = run.masks.balance_every
    if every != cfg.sparse.adapt.sample_every or every < 2:
        raise RuntimeError(
            f"the manager samples every {every} iterations, the config every {cfg.sparse.adapt.sample_every}"
        )
    measured = {net: density(run.masks, net) for net in NETWORKS}
    window = run.masks.method.window  # ADAPT's balance window: it counts the samples taken

    # The warm-up ends on a sampling step, so the first balance pass (its allocations) is not timed and every timed
    # block starts right after a multiple of ``every``: its last iteration is the one that samples.
    run.step = (-settings.warmup) % every
    progress(
        f"{config} ADAPT balance sampling: warm-up {settings.warmup} + {settings.balance_repeats} interleaved rounds "
        f"of 2 x {every} iterations"
    )
    for _ in range(settings.warmup):
        train_iteration(run)
    gc.collect()
    sides = {"sampling": None, "none": 0}  # GanStep.balance_every: None the method's (every), 0 never
    taken = len(window.samples)
    blocks: dict[str, list[list[float]]] = {side: [] for side in sides}
    for i in range(settings.balance_repeats):
        order = tuple(sides) if i % 2 == 0 else tuple(sides)[::-1]
        for side in order:
            block = [timed(lambda b=sides[side]: train_iteration(run, balance_every=b)) for _ in range(every)]
            blocks[side].append(block)
    # One sample per sampling block and none elsewhere (a full window keeps its size). A decision cannot have
    # fallen among them: train_iteration stops at any topology change.
    if len(window.samples) != min(taken + settings.balance_repeats, window.size):
        raise RuntimeError(
            f"{len(window.samples) - taken} balance samples taken in {settings.balance_repeats} sampling blocks"
        )

    means = {side: [sum(block) / every for block in blocks[side]] for side in sides}
    stats = {side: median_iqr(values) for side, values in means.items()}
    ratios = [s / n for s, n in zip(means["sampling"], means["none"], strict=True)]
    passes = median_iqr([block[-1] - statistics.median(block[:-1]) for block in blocks["sampling"]])
    plain = stats["none"]["median_s"]
    return {
        "config": f"{config} with sparse.method=adapt, no topology update or decision",
        "device": str(settings.device),
        "batch_size": settings.batch,
        "d_steps": settings.d_steps,
        "sample_every": every,
        "measured_density": measured,
        # Per-iteration means of the blocks, seconds.
        "sampling": stats["sampling"],
        "none": stats["none"],
        "overhead_pct": 100 * (stats["sampling"]["median_s"] / plain - 1),
        "overhead_paired_pct": 100 * (statistics.median(ratios) - 1),  # the median of per-round ratios
        # One balance pass, measured directly, and its share of an iteration at the sampling interval.
        "balance_pass": passes,
        "pass_per_iteration_s": passes["median_s"] / every,
        "pass_per_iteration_pct": 100 * passes["median_s"] / every / plain,
    }


def print_balance(result: dict[str, Any]) -> None:
    """The table of a :func:`bench_balance` result, on stdout."""
    every, dens = result["sample_every"], result["measured_density"]
    print(
        f"ADAPT balance-ratio sampling, {result['config']}: G {dens['G']:.3f} / D {dens['D']:.3f} measured, "
        f"batch {result['batch_size']}, {result['d_steps']} D step(s), {result['device']}"
    )
    print(f"   per training iteration (the mean of each block of {every} iterations):")
    print(stat_row(f"sampling every {every} iterations", result["sampling"]))
    print(stat_row("no sampling (balance_every=0)", result["none"]))
    print(
        f"   overhead: {result['overhead_pct']:+.2f}% of an iteration (medians), "
        f"{result['overhead_paired_pct']:+.2f}% (median of paired rounds)"
    )
    print(stat_row("one balance pass, measured directly", result["balance_pass"]))
    print(
        f"   cross-check: one pass / {every} = {fmt_time(result['pass_per_iteration_s'])} per iteration, "
        f"{result['pass_per_iteration_pct']:.2f}% of an iteration"
    )


# --------------------------------------------------------------------------------------------------------------------
# Report.


def print_report(result: dict[str, Any]) -> None:
    """The tables of a :func:`run` result, on stdout."""
    meta = result["meta"]
    print(f"sgtrain sparse overhead   {meta['date']}")
    print(f"torch {meta['torch']}, {meta['threads']} threads, CPU {meta['cpu_model']} ({meta['cpus']} logical)")
    print(f"load average (1 min) {meta['load_avg_start'][0]:.2f} at start, {meta['load_avg_end'][0]:.2f} at end")

    it = result["iteration"]
    full = " (the paper's full iteration)" if (it["batch_size"], it["d_steps"]) == (50, 4) else ""
    print()
    print(
        f"1. CIFAR-10 BigGAN training iteration, sparse vs dense: batch {it['batch_size']}, {it['d_steps']} D step(s)"
    )
    print(f"   per G step{full}; the paper's recipe is batch 50 with 4 D steps (--batch 50 --d-steps 4).")
    print(f"   dense FLOPs per iteration {format_flops(it['dense_iteration_flops'])}; steps between topology updates.")
    dens = it["measured_density"]
    print(f"   {'':<8}{'G density':>10}{'D density':>10}{'median':>12}{'IQR':>12}{'n':>5}")
    for name in ("dense", "sparse"):
        s = it[name]
        row = f"{dens[name]['G']:>10.3f}{dens[name]['D']:>10.3f}{fmt_time(s['median_s']):>12}"
        print(f"   {name:<8}{row}{fmt_time(s['iqr_s']):>12}{s['n']:>5}")
    print(
        f"   overhead sparse/dense - 1: {it['overhead_pct']:+.1f}% (medians), "
        f"{it['overhead_paired_pct']:+.1f}% (median of paired rounds)"
    )

    en = result["enforcement"]
    print()
    print(
        f"2. Mask enforcement alone, CIFAR-10 G + D: {en['masked_weights'] / 1e6:.2f}M masked weights of "
        f"{en['parameters'] / 1e6:.2f}M parameters, gradients present"
    )
    print(f"   timed: {en['calls']}")
    print(f"   {'':<38}{'median':>12}{'IQR':>12}{'n':>5}")
    for key, label in (("manager", "MaskManager"), ("naive_state_dict", "naive state_dict round trip")):
        s = en[key]
        print(f"   {label:<38}{fmt_time(s['median_s']):>12}{fmt_time(s['iqr_s']):>12}{s['n']:>5}")
    share = 100 * en["manager"]["median_s"] / it["sparse"]["median_s"]
    print(f"   speed-up {en['speedup']:.1f}x; the manager's masking is {share:.1f}% of a sparse iteration above")
    print("   (with d_steps > 1, D's pair of calls runs once per D step)")

    tp, im = result["topology"], result["imagenet_iteration"]
    print()
    print("3. ImageNet-128 BigGAN: topology update vs training iteration")
    mw = tp["masked_weights"]
    print(f"   {tp['config']}; masked weights G {mw['G'] / 1e6:.1f}M, D {mw['D'] / 1e6:.1f}M")
    print(f"   drop fraction {tp['drop_fraction']:.3f} (at the first update; cosine-decayed from 0.5)")
    for key, label in (("score_capture", "before_step at an update step (scores)"), ("maybe_update", "maybe_update")):
        print(stat_row(label, tp[key]))
    print(f"   sparse training iteration ({im['config']}):")
    for batch, s in im["measured"].items():
        print(stat_row(f"  measured at batch {batch}", s))
    gb = im["global_batch"]
    print(f"   EXTRAPOLATED to the config's global batch {gb} on this CPU (FLOPs scale linearly with the batch):")
    if "extrapolated_linear_s" in im:
        print(
            f"   {'  linear fit (fixed + per image)':<42}{fmt_time(im['extrapolated_linear_s']):>10}"
            f"  ({fmt_time(im['fit_fixed_s'])} + {fmt_time(im['fit_per_image_s'])} x {gb})"
        )
    print(f"   {'  proportional to the smallest batch':<42}{fmt_time(im['extrapolated_proportional_s']):>10}")
    print(
        f"   one update = {100 * im['update_vs_iteration']:.2f}% of one extrapolated iteration; every "
        f"{im['update_every']} G steps that is {im['amortized_update_pct']:.2g}% of training time"
    )
    print(f"\n(total wall time {meta['wall_s']:.0f} s)")


def run(settings: Settings) -> dict[str, Any]:
    """The three measurements of the module docstring, ``{"meta", "iteration", "enforcement", "topology",
    "imagenet_iteration"}``; also written to ``settings.json`` when set."""
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}
    meta = machine("date", "torch", "python", "cpu_model", "cpus", "threads", "load_avg_start") | {"args": args}
    result: dict[str, Any] = {"meta": meta}
    result["iteration"] = bench_iteration(settings)
    result["enforcement"] = bench_enforcement(settings)
    result["topology"] = bench_topology(settings)
    result["imagenet_iteration"] = bench_imagenet_iteration(settings, result["topology"]["maybe_update"]["median_s"])
    result["meta"]["load_avg_end"] = load_avg()
    result["meta"]["wall_s"] = time.perf_counter() - start
    if settings.json is not None:
        write_json(settings.json, result)
    return result
