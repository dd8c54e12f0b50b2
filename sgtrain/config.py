"""Typed configuration: dataclass defaults, YAML deltas, dotted command-line overrides.

A run's configuration is resolved in three layers, each a delta over the one before:

1. the dataclass defaults below (the embedded ``digits`` job),
2. a YAML file (``--config imagenet128.yaml``; a bare name resolves to the shipped ``configs/``),
3. dotted overrides (``--train.steps=200 --model.g_ch=32``).

Unknown keys fail and name the nearest valid key; bad values fail with a one-line message. Both raise
:class:`ConfigError`, which the CLI turns into exit code 2 before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MIXED_PRECISION = ("no", "bf16")
NONFINITE_POLICIES = ("skip", "rollback")
AUGMENT_POLICIES = ("translation", "cutout")  # train.augment: DiffAugment's policies (sgtrain/augment.py)
SPARSE_METHODS = ("dense", "static", "stu", "snip", "gmp", "prune_finetune", "adapt")
ADAPT_VARIANTS = ("relax", "strict")
SELECTIONS = ("global", "layer")
GROWTH_MODES = ("gradient", "random", "momentum")
OPTIMIZER_STATES = ("dense", "masked")


class ConfigError(ValueError):
    """A configuration that cannot be run; the message is one line meant for the user."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(kw_only=True)
class ModelConfig:
    """BigGAN architecture (Brock et al. 2019) for 32, 64 or 128 px, or the user's own pair (``builder``)."""

    # Your own G and D instead of BigGAN: "package.module:function", called with this config and returning
    # (generator, discriminator); see README, "Bring your own GAN". The BigGAN-only fields below are then ignored.
    builder: str | None = None
    resolution: int = 32  # output side in pixels: 32, 64 or 128
    n_classes: int = 10  # number of conditioning classes
    g_ch: int = 4  # generator channel multiplier ("ch" of BigGAN; 64 for CIFAR-10, 96 for ImageNet)
    d_ch: int = 4  # discriminator channel multiplier
    dim_z: int = 120  # latent size; with hier it is split into len(blocks)+1 chunks
    # shared class embedding size (BigGAN at 128 px: 128); 0 = one class embedding per conditional BN. 16 here: with
    # a 128-d class code beside each block's 30-d chunk of z, the digits lost their within-class variety sooner.
    shared_dim: int = 16
    hier: bool = True  # hierarchical latents: a z chunk goes to every generator block
    g_attn: list[int] = field(default_factory=list)  # resolutions with self-attention in G (e.g. [64])
    d_attn: list[int] = field(default_factory=list)  # resolutions with self-attention in D
    init: str = "ortho"  # weight init: ortho | N02 | xavier
    bn_eps: float = 1e-5
    sn_eps: float = 1e-8
    # G draws one grey channel, repeated over R, G and B, for greyscale data (the bundled digits): real grey images
    # have R = G = B, so an RGB G spends its first steps learning to remove colour that D uses to tell fakes apart.
    grey: bool = False

    def __post_init__(self) -> None:
        _check(self.resolution in (32, 64, 128), f"model.resolution must be 32, 64 or 128, got {self.resolution}")
        _check(self.n_classes >= 1, f"model.n_classes must be >= 1, got {self.n_classes}")
        _check(self.g_ch >= 1, f"model.g_ch must be >= 1, got {self.g_ch}")
        _check(self.d_ch >= 1, f"model.d_ch must be >= 1, got {self.d_ch}")
        _check(self.dim_z >= 1, f"model.dim_z must be >= 1, got {self.dim_z}")
        _check(self.shared_dim >= 0, f"model.shared_dim must be >= 0, got {self.shared_dim}")
        _check(self.init in ("ortho", "N02", "xavier"), f"model.init must be ortho, N02 or xavier, got {self.init!r}")
        # Attention sits after a block, so only the blocks' output sides are valid: G upsamples from 4x4 to the
        # full resolution; D downsamples to 8x8 at 32px and to 4x4 at 64 and 128px.
        g_sides = [side for side in (8, 16, 32, 64, 128) if side <= self.resolution]
        d_sides = [side for side in (64, 32, 16, 8, 4) if side < self.resolution and (side > 4 or self.resolution > 32)]
        for name, sides in (("g_attn", g_sides), ("d_attn", d_sides)):
            bad = [r for r in getattr(self, name) if r not in sides]
            _check(not bad, f"model.{name}: no {self.resolution}px block outputs {bad}px; choose from {sides}")
        _check(self.bn_eps > 0 and self.sn_eps > 0, "model.bn_eps and model.sn_eps must be > 0")


@dataclass(kw_only=True)
class DataConfig:
    """Where training images come from."""

    dataset: str = "digits"  # bundled real data when no shards are given: digits | mnist5k
    # webdataset shards (`python -m sgtrain make-shards`): a brace pattern (/data/train-{000000..000639}.tar), a
    # directory of shards with its manifest.json, any URL webdataset opens (pipe:, http://), or a bundled dataset's
    # name (digits | mnist5k: its shards are written once into ~/.cache/sgtrain). None: data.dataset, in memory.
    shards: str | None = None
    num_workers: int = 0  # data-loader worker processes per rank (shards only; each needs a shard of its own)
    resampled: bool = False  # shards drawn with replacement (infinite, no epochs) instead of disjoint per worker
    max_bad_fraction: float = 0.001  # corrupt samples are skipped and counted; past this fraction the run stops

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(
            0.0 <= self.max_bad_fraction < 1.0, f"data.max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}"
        )
        _check(bool(self.dataset), "data.dataset must name a bundled dataset")


EVAL_METRICS = {"fid": "lower", "kid": "lower", "is": "higher", "precision": "higher", "recall": "higher"}


@dataclass(kw_only=True)
class TrainConfig:
    """The GAN training loop. Progress is counted in generator steps."""

    steps: int = 4000  # generator steps in the whole run
    batch_size: int = 32  # global images per D (and G) step, summed over ranks and accumulation rounds
    accumulation: int = 1  # micro-batches per optimizer step (gradient accumulation)
    d_steps: int = 1  # discriminator steps per generator step
    # The small default (docs/recipe_sweep.md): D at 4x G's rate stands in for the 4 D steps of the authors' recipe.
    g_lr: float = 5e-4
    d_lr: float = 2e-3
    # After this fraction of the run, G's learning rate falls linearly towards 0 at its last step while D's stays:
    # the small digits recipe keeps its recall that way (docs/recipe_sweep.md). None: constant rates, as the
    # authors train (the shipped BigGAN configs say so).
    g_lr_decay_from: float | None = 0.333
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Adam betas (BigGAN: 0, 0.999)
    adam_eps: float = 1e-6  # BigGAN's Adam epsilon
    ema_decay: float = 0.995  # generator EMA decay per G step (BigGAN: 0.9999 over 100k+ steps)
    ema_start: int = 1300  # G step at which the EMA starts averaging (it copies G before)
    # The EMA's buffers (batch-norm running statistics, spectral-norm vectors): average them with the same decay as
    # the weights (BigGAN-PyTorch and the STU-GAN authors, whose `utils.ema` walks the whole state dict) | copy G's.
    ema_buffers: str = "average"
    # DiffAugment (Zhao et al. 2020) on every image D sees, real and fake, in D's and G's steps: translation | cutout,
    # in this order. Off ([]) as in the authors' recipe; for small datasets, whose D otherwise memorises them.
    augment: list[str] = field(default_factory=list)
    mixed_precision: str = "no"  # no | bf16 (autocast; losses and SN power iteration kept in fp32)
    # G's batch norm over the global batch, as BigGAN's cross-replica BN: a run then matches a one-process run of the
    # same global batch. Off: per-rank statistics (no collective inside the forward pass).
    cross_replica_bn: bool = True
    sample_every: int = 500  # G steps between fixed-noise sample grids
    checkpoint_every: int = 500  # G steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # checkpoints kept in the run directory (the last K)
    log_every: int = 50  # G steps between metrics.jsonl records
    # Evaluation during training (0: off): every eval_every G steps, at a checkpoint, the EMA generator's metrics
    # (`sgtrain evaluate`) on eval_samples samples are logged, and the keep_best checkpoints best by eval_metric are
    # kept in run_dir/best/ (fid and kid: lower is better; is, precision, recall: higher).
    eval_every: int = 0
    eval_samples: int = 1000
    eval_metric: str = "fid"
    keep_best: int = 1
    # classes shown in a sample grid (one row each); None: the model's first min(10, model.n_classes), resolved and
    # saved as a number
    sample_classes: int | None = None
    # A NaN or Inf in a loss or gradient, found before the optimizer step that would apply it: skip (drop that D or
    # G update and go on; not under DeepSpeed, whose engine steps inside backward) or rollback (restart from the
    # latest checkpoint). Past max_nonfinite such events in one process the run stops (exit 4). No checkpoint with a
    # non-finite value is ever written.
    nonfinite: str = "skip"
    max_nonfinite: int = 10
    # Seconds a rank waits in a collective for its peers (a dead or hung rank) before it fails with an error.
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accumulation", "d_steps", "sample_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _check(
            self.eval_every % self.checkpoint_every == 0,
            f"train.eval_every ({self.eval_every}) must be a multiple of train.checkpoint_every "
            f"({self.checkpoint_every}): the best checkpoints are kept from those written",
        )
        _check(self.eval_samples >= 10, f"train.eval_samples must be >= 10, got {self.eval_samples}")
        _check(
            self.eval_metric in EVAL_METRICS,
            f"train.eval_metric must be one of {', '.join(EVAL_METRICS)}, got {self.eval_metric!r}",
        )
        _check(self.keep_best >= 1, f"train.keep_best must be >= 1, got {self.keep_best}")
        _check(
            self.sample_classes is None or self.sample_classes >= 1,
            f"train.sample_classes must be >= 1, got {self.sample_classes}",
        )
        _check(
            self.nonfinite in NONFINITE_POLICIES,
            f"train.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite!r}",
        )
        _check(self.max_nonfinite >= 0, f"train.max_nonfinite must be >= 0, got {self.max_nonfinite}")
        _check(
            self.collective_timeout_s > 0, f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}"
        )
        for name in ("g_lr", "d_lr"):
            _check(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        _check(
            self.g_lr_decay_from is None or 0 <= self.g_lr_decay_from < 1,
            f"train.g_lr_decay_from must be in [0, 1) or null, got {self.g_lr_decay_from}",
        )
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _check(self.adam_eps > 0, f"train.adam_eps must be > 0, got {self.adam_eps}")
        _check(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.ema_start >= 0, f"train.ema_start must be >= 0, got {self.ema_start}")
        _check(
            self.ema_buffers in ("average", "copy"),
            f"train.ema_buffers must be average or copy, got {self.ema_buffers!r}",
        )
        bad = [p for p in self.augment if p not in AUGMENT_POLICIES]
        _check(not bad, f"train.augment: unknown {bad}; choose from {', '.join(AUGMENT_POLICIES)}")
        _check(len(set(self.augment)) == len(self.augment), f"train.augment lists a policy twice: {self.augment}")
        _check(
            self.mixed_precision in MIXED_PRECISION,
            f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )
        _check(
            self.batch_size % self.accumulation == 0,
            f"train.batch_size ({self.batch_size}) must be divisible by train.accumulation ({self.accumulation})",
        )

    def g_lr_at(self, step: int) -> float:
        """G's learning rate for the update that takes G from ``step`` steps to ``step + 1``: ``g_lr`` up to step
        ``s = round(g_lr_decay_from * steps)``, then ``g_lr * (steps - step) / (steps - s)``, down to
        ``g_lr / (steps - s)`` at the last update."""
        if self.g_lr_decay_from is None:
            return self.g_lr
        start = round(self.g_lr_decay_from * self.steps)
        if step < start:
            return self.g_lr
        return self.g_lr * max(0, self.steps - step) / (self.steps - start)


@dataclass(kw_only=True)
class AdaptConfig:
    """ADAPT (``sparse.method: adapt``; Wang et al., NeurIPS 2023): D's density steered by the balance ratio, G
    sparse-to-sparse. Defaults are those of YiteWang/ADAPT's ``scripts/adapt_relax.sh`` (the flag in brackets);
    ``variant: strict`` gives ``adapt_strict.sh``'s where they differ. README, "ADAPT", lists the differences."""

    variant: str = "relax"  # relax: D's density may grow to dense | strict: up to `cap`, where D explores instead
    lower: float = 0.45  # [--da-lb] a window's ratio at or below it shrinks D by `step` (D too strong)
    upper: float = 0.55  # [--da-ub] at or above it D grows by `step` (D too weak)
    step: float = 0.05  # [--death-rate-D] the additive density step
    minimum: float = 0.05  # D's density never goes below it (hard-coded there)
    cap: float = 0.5  # strict only: D's highest density (hard-coded 0.5 there)
    sample_every: int = 10  # [--br_freq] G iterations between balance-ratio samples (one extra D forward each)
    window: int = 100  # [--da-iters / --br_freq] the latest samples whose mean ratio a decision reads
    # [--update_frequency_D] G iterations between D's density decisions; null: relax 1000, strict 2000.
    update_every: int | None = None
    grow: str = "gradient"  # [--growth-D global_gradient] what D grows by: gradient | random | momentum
    # How a change picks weights, in D and in G's drop-and-grow: global (one threshold over the network, the
    # authors' global_magnitude / global_gradient; per-layer densities drift) | layer (each layer at the
    # distribution's count for the new density: STU-GAN's layer-wise rule, ERK re-solved at every change).
    selection: str = "global"
    # Strict at its cap: the fraction of D's active weights dropped and regrown at a decision, cosine-decayed over
    # the run to the floor [--death-rate-D-dd-b 0.5, CosineDecay eta_min 0.005].
    explore_drop_fraction: float = 0.5
    explore_drop_fraction_min: float = 0.005

    def __post_init__(self) -> None:
        _check(
            self.variant in ADAPT_VARIANTS,
            f"sparse.adapt.variant must be one of {', '.join(ADAPT_VARIANTS)}, got {self.variant!r}",
        )
        _check(
            self.lower < self.upper,
            f"sparse.adapt.lower < sparse.adapt.upper must hold, got {self.lower}, {self.upper}",
        )
        _check(0 < self.step <= 1, f"sparse.adapt.step must be in (0, 1], got {self.step}")
        _check(0 < self.minimum <= 1, f"sparse.adapt.minimum must be in (0, 1], got {self.minimum}")
        if self.variant == "strict":
            _check(
                self.minimum <= self.cap <= 1,
                f"sparse.adapt.minimum <= sparse.adapt.cap <= 1 must hold, got {self.minimum}, {self.cap}",
            )
        _check(self.sample_every >= 1, f"sparse.adapt.sample_every must be >= 1, got {self.sample_every}")
        _check(self.window >= 1, f"sparse.adapt.window must be >= 1, got {self.window}")
        _check(
            self.update_every is None or self.update_every >= 1,
            f"sparse.adapt.update_every must be >= 1 (or null), got {self.update_every}",
        )
        _check(
            self.grow in GROWTH_MODES,
            f"sparse.adapt.grow must be one of {', '.join(GROWTH_MODES)}, got {self.grow!r}",
        )
        _check(
            self.selection in SELECTIONS,
            f"sparse.adapt.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}",
        )
        _check(
            0 <= self.explore_drop_fraction_min <= self.explore_drop_fraction < 1,
            "0 <= sparse.adapt.explore_drop_fraction_min <= sparse.adapt.explore_drop_fraction < 1 must hold, got "
            f"{self.explore_drop_fraction_min}, {self.explore_drop_fraction}",
        )

    @property
    def decide_every(self) -> int:
        """G iterations between D's density decisions (``update_every``, or the variant's script default)."""
        if self.update_every is not None:
            return self.update_every
        return 1000 if self.variant == "relax" else 2000

    @property
    def highest(self) -> float:
        """D's highest density: dense under relax, the cap under strict."""
        return 1.0 if self.variant == "relax" else self.cap


@dataclass(kw_only=True)
class SparseConfig:
    """Sparse-to-sparse training (docs/design.md, "The sparse core"). Densities are fractions of masked weights kept."""

    method: str = "dense"  # dense | static | stu | snip | gmp | prune_finetune | adapt
    distribution: str = "ERK"  # layer-wise densities: uniform | ER | ERK
    erk_power: float = 1.0  # exponent on the (E)R(K) layer score; 1 is the paper's
    density_g: float = 1.0  # overall density of the generator's masked weights, in (0, 1]
    density_d: float = 1.0  # overall density of the discriminator's masked weights, in (0, 1]
    targets: str = "conv_only"  # masked tensors: conv_only (4-D conv weights, the authors') | conv_linear (+ linear)
    dense_first_last: bool = False  # keep each network's first and last masked layer dense
    explore: str = "G"  # networks whose topology is updated (stu): G | D | GD | none
    grow_g: str = "gradient"  # how G grows: gradient (RigL) | random (SET) | momentum (an EMA of dense gradients)
    grow_d: str = "random"  # how D grows when it explores
    update_every: int = 500  # G steps between topology updates (stu) or pruning steps (gmp)
    update_end: float = 1.0  # fraction of the run after which topologies stay fixed (the authors: to the end)
    drop_fraction: float = 0.5  # fraction of each layer's active weights replaced at the first update (cosine-decayed)
    # The cosine's floor, reached at update_end: the authors' CosineDecay(eta_min=0.005); RigL's cosine ends at 0.
    drop_fraction_min: float = 0.005
    # What Adam sees of inactive weights. dense (the authors'): the full gradient, weights re-masked after every step,
    # so inactive weights keep warm moments and a grown weight's first steps are of normal size. masked: gradients of
    # inactive weights zeroed, their moments stay zero, as a truly sparse optimizer would keep them (sgtrain still
    # stores them densely); a grown weight's second moment is then seeded with the mean second moment of the layer's
    # weights that stay active (README, "Optimizer state of inactive and grown weights").
    optimizer_state: str = "dense"
    gmp_start: float = 0.1  # gmp: fraction of the run where pruning starts (dense before)
    gmp_end: float = 0.6  # gmp: fraction of the run where the final density is reached
    prune_from: str | None = None  # prune_finetune: the dense checkpoint (.pt file or run directory) to prune
    prune_scope: str = "global"  # prune_finetune: global (one magnitude threshold per network) | layer (distribution)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # adapt: the balance ratio and D's density rule

    def __post_init__(self) -> None:
        _check(
            self.method in SPARSE_METHODS,
            f"sparse.method must be one of {', '.join(SPARSE_METHODS)}, got {self.method!r}",
        )
        _check(
            self.distribution in ("uniform", "ER", "ERK"),
            f"sparse.distribution must be uniform, ER or ERK, got {self.distribution!r}",
        )
        _check(self.erk_power > 0, f"sparse.erk_power must be > 0, got {self.erk_power}")
        for name in ("density_g", "density_d"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"sparse.{name} must be in (0, 1], got {value}")
        _check(
            self.targets in ("conv_linear", "conv_only"),
            f"sparse.targets must be conv_linear or conv_only, got {self.targets!r}",
        )
        _check(
            self.explore in ("G", "D", "GD", "none"), f"sparse.explore must be G, D, GD or none, got {self.explore!r}"
        )
        for name in ("grow_g", "grow_d"):
            value = getattr(self, name)
            _check(value in GROWTH_MODES, f"sparse.{name} must be one of {', '.join(GROWTH_MODES)}, got {value!r}")
        _check(self.update_every >= 1, f"sparse.update_every must be >= 1, got {self.update_every}")
        _check(0 < self.update_end <= 1, f"sparse.update_end must be in (0, 1], got {self.update_end}")
        _check(0 <= self.drop_fraction < 1, f"sparse.drop_fraction must be in [0, 1), got {self.drop_fraction}")
        _check(
            0 <= self.drop_fraction_min < 1, f"sparse.drop_fraction_min must be in [0, 1), got {self.drop_fraction_min}"
        )
        if self.method in ("stu", "adapt"):  # only their schedules decay the drop fraction
            _check(
                self.drop_fraction_min <= self.drop_fraction,
                f"sparse.drop_fraction_min ({self.drop_fraction_min}) must not exceed sparse.drop_fraction "
                f"({self.drop_fraction}): it is the floor the drop fraction decays to",
            )
        _check(
            self.optimizer_state in OPTIMIZER_STATES,
            f"sparse.optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, got {self.optimizer_state!r}",
        )
        _check(
            0 <= self.gmp_start < self.gmp_end <= 1,
            f"sparse.gmp_start < sparse.gmp_end must lie in [0, 1], got {self.gmp_start}, {self.gmp_end}",
        )
        _check(
            self.prune_scope in ("global", "layer"),
            f"sparse.prune_scope must be global or layer, got {self.prune_scope!r}",
        )
        if self.method == "prune_finetune":
            _check(
                self.prune_from is not None, "sparse.method=prune_finetune needs sparse.prune_from: a dense checkpoint"
            )
        if self.method == "adapt":
            a = self.adapt
            _check(
                self.explore in ("G", "none"),
                f"sparse.method=adapt steers D's topology itself; sparse.explore must be G or none, "
                f"got {self.explore!r}",
            )
            _check(
                not (self.dense_first_last and a.selection == "global"),
                "sparse.dense_first_last keeps layers out of every change, which one threshold over the network "
                "cannot: use sparse.adapt.selection: layer with it",
            )
            _check(
                a.minimum <= self.density_d <= a.highest,
                f"sparse.density_d ({self.density_d}) must lie within ADAPT's range [{a.minimum}, {a.highest}] "
                "(sparse.adapt.minimum, and the cap under variant strict)",
            )
        if self.method == "dense":
            _check(
                self.density_g == 1 and self.density_d == 1,
                "sparse.method=dense trains every weight; set sparse.method (e.g. stu or static) to use densities < 1",
            )


WANDB_MODES = ("online", "offline", "disabled")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases, mirroring metrics.jsonl from rank 0: one W&B run per run directory, continued on resume."""

    enabled: bool = False  # off: wandb is not even imported
    project: str = "sgtrain"
    entity: str | None = None  # user or team; None: the API key's default entity
    # online: stream to the server (needs `wandb login` or WANDB_API_KEY) | offline: write run_dir/wandb/, upload
    # later with `wandb sync run_dir/wandb` | disabled: as enabled=false. This setting wins over $WANDB_MODE.
    mode: str = "offline"
    name: str | None = None  # display name; None: the run directory's name
    group: str | None = None  # groups runs in the UI, e.g. the seeds of one setting
    tags: list[str] = field(default_factory=list)  # each 1-64 characters
    log_images: bool = True  # upload the sample grids (train.sample_every) as images

    def __post_init__(self) -> None:
        _check(
            self.mode in WANDB_MODES,
            f"tracking.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}",
        )
        _check(bool(self.project), "tracking.wandb.project must not be empty")
        _check(self.entity is None or bool(self.entity), "tracking.wandb.entity must not be empty (null: the default)")
        bad = [tag for tag in self.tags if not 1 <= len(tag) <= 64]
        _check(not bad, f"tracking.wandb.tags must be 1-64 characters each, got {bad}")


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment trackers besides run_dir/metrics.jsonl, which is always written and stays the record."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(kw_only=True)
class Config:
    """A whole run."""

    run_dir: str = "runs/digits"  # checkpoints, samples, metrics.jsonl and config.yaml go here
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir must not be empty")
        if self.train.sample_classes is None:  # follows the model unless set: --model.n_classes=3 alone just works
            self.train.sample_classes = min(10, self.model.n_classes)
        _check(
            self.train.sample_classes <= self.model.n_classes,
            f"train.sample_classes ({self.train.sample_classes}) exceeds model.n_classes ({self.model.n_classes})",
        )


# --------------------------------------------------------------------------------------------------------------------
# Loading.


def resolve_config_path(name: str | Path, folder: Path = CONFIG_DIR, kind: str = "config") -> Path:
    """A path as given if it exists, else a bare name looked up in the shipped ``folder`` (``configs/``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
        if len(path.parts) == 1 and candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in folder.glob("*.yaml")))
    raise ConfigError(f"{kind} file {str(name)!r} not found (shipped {kind}s: {shipped})")


def _merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in delta.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def _read_tree(config: str | Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML delta, itself applied over the file named by its optional ``base:`` key (e.g. ``base: cifar10.yaml``)."""
    path = resolve_config_path(config)
    if path.resolve() in chain:
        raise ConfigError(f"{path}: its base: chain loops back to itself")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    tree = loaded or {}
    base = tree.pop("base", None)
    if base is None:
        return tree
    beside = path.parent / str(base)
    if not Path(str(base)).is_absolute() and beside.is_file():
        base = beside  # relative to the file that names it, else a shipped config
    return _merge(_read_tree(base, (*chain, path.resolve())), tree)


def load_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML delta in ``config``, then dotted ``overrides`` such as ``{"train.steps": 200}``."""
    tree: dict[str, Any] = _read_tree(config) if config is not None else {}
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, leaf = dotted.replace("-", "_").split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
            node = child
        node[leaf] = value
    return _build(Config, tree, prefix="")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Check (and gently convert, e.g. '1e-4' or 'true' from a shell) ``value`` against a field's type."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} is a section; give its keys, e.g. --{name}.<key>=...")
        return _build(hint, value, prefix=f"{name}.")
    if origin in (types.UnionType, typing.Union):  # only ``X | None`` is used
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _coerce(inner, value, name)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(inner, item, f"{name}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {name}")  # a bug in this module, not user input


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a saved config (e.g. from a checkpoint); it was valid when saved, so errors here mean corruption."""
    return _build(Config, tree, prefix="")
