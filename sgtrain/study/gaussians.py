"""The 2-D mixture-of-Gaussians benchmark of mode collapse (VEEGAN / PacGAN protocol), for sparse GAN training.

A small MLP GAN learns a mixture of 2-D Gaussians while :class:`~sgtrain.sparse.MaskManager` keeps its weights sparse
exactly as in the BigGAN training loop (``sgtrain/train.py``). One run ("cell") takes seconds on one CPU thread, so
methods and densities can be compared over many seeds.

Protocol, as in PacGAN (Lin et al. 2018, "The power of two samples in GANs"), which follows VEEGAN
(Srivastava et al. 2017). Figures taken from PacGAN's released code (github.com/fjxmlzn/PacGAN,
``synthetic_data_experiments/2D{Ring,Grid}_GAN&PacGAN/config.py`` and ``PacGAN/pacgan/extensions.py``,
``MetricLogger``):

- ``ring8``: 8 Gaussians with means ``(cos(2 pi k / 8), sin(2 pi k / 8))`` (radius 1) and std 0.01 (variance 1e-4).
  (A ring of radius 2 with std 0.02, sometimes quoted for this benchmark, is not what PacGAN's code trains on.)
- ``grid25``: 25 Gaussians with means ``{-4, -2, 0, 2, 4}^2`` (spacing 2) and std 0.05 (variance 0.0025).
- 2500 generated samples are scored. A sample is *high quality* if it lies within 3 standard deviations (Euclidean
  distance, the modes being isotropic) of its nearest centre; ``hq_rate`` is their fraction.
- A mode is *covered* if at least one high-quality sample has it as its nearest centre (``MetricLogger`` counts the
  modes with a non-zero count). A stricter rule is sometimes quoted, "a mode is lost if fewer than 20 of the 2500
  samples lie within 3 std of it"; the released code does not apply it, so it is reported separately as
  ``modes_covered_20``.
- ``reverse_kl``: how unevenly the samples spread over the modes (``MetricLogger`` computes a JSD of its
  high-quality histogram against uniform for the same purpose). Here every generated sample is assigned to its
  nearest centre and that histogram ``q`` is compared with the uniform mixture weights ``p``:
  ``KL(q || p) = sum_k q_k log(q_k K)``, 0 for a perfectly balanced generator, ``log K`` for total collapse.

Networks: PacGAN's G has 4 hidden layers of 400 units (batch norm, ReLU) on a 2-D latent; its D 3 maxout layers of
200 units. Here both are plain ReLU MLPs (every weight layer is an ``nn.Linear`` that the mask manager covers, no
norm layers) and smaller by default (3 hidden layers of 128 each), so that a cell runs in about 20 s on one CPU
thread; the loss is the non-saturating GAN loss (Goodfellow et al. 2014), unconditional. PacGAN trains with Adam
1e-4, beta1 0.8, batch 100 for 400 epochs of 100k samples (400k steps); in 3000 steps the defaults here (Adam 1e-3
for both nets, betas (0.5, 0.9), cosine decay to 0, batch 128) were what brought dense training to every mode of
ring8 and most of grid25's, briefly tuned on seeds 0-2.

Usage::

    from sgtrain.study.gaussians import gaussians_config, train_gaussians
    cfg = gaussians_config({"dataset": "grid25", "sparse": {"method": "stu", "density_g": 0.1}})
    result = train_gaussians(cfg, Path("runs/gaussians/grid25-stu-0.1-seed0"))
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from sgtrain.checkpoint import write_atomic

# The repo's dict -> dataclass builder: unknown keys fail naming the nearest valid key, values are checked and
# gently converted, exactly as for the main training config.
from sgtrain.config import ConfigError, SparseConfig, _build, _check
from sgtrain.flops import dense_weight_gradients, layer_forward_flops, layers_iteration_flops
from sgtrain.losses import NON_SATURATING
from sgtrain.sparse import MaskManager
from sgtrain.step import GanStep, LocalNetwork

DATASETS = ("ring8", "grid25")
HQ_STDS = 3.0  # a high-quality sample lies within this many standard deviations of its nearest centre
STRICT_MIN_SAMPLES = 20  # the stricter coverage rule: at least 20 high-quality samples (of 2500) per mode
RESULT_FILE = "result.json"
# The networks see coordinates divided by this (the grid's corners at +-1, like the ring), so that with PyTorch's
# default init both problems start at the same scale: unscaled, dense grid25 runs covered 22-23 of the 25 modes
# where scaled ones covered all 25 (seed 0, two settings). Samples are scored in the data's own units.
DATA_SCALE = {"ring8": 1.0, "grid25": 4.0}
PLOT_LIMITS = {"ring8": 1.5, "grid25": 6.0}  # fixed axes (PacGAN plots the grid on [-6, 6]^2): plots compare


@dataclass(kw_only=True)
class GaussiansConfig:
    """One cell of the benchmark: a dataset, a seed, the GAN's optimisation and the sparse method."""

    dataset: str = "grid25"  # ring8 | grid25
    seed: int = 0  # initial weights, masks, data and latents all follow from it
    steps: int = 3000  # G steps (one D step each); 4000 was no better on ring8 over seeds 0-2, and slower
    batch_size: int = 128  # real samples per D step; also fakes per D step and latents per G step
    g_lr: float = 1e-3
    d_lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas
    # constant | cosine (both learning rates to 0 at the last step). At a constant rate Adam's steps keep the
    # samples jittering far wider than the modes' 3 std (0.03 on the ring): cosine took ring8 from ~16% to ~70-90%
    # high-quality samples in the same number of steps.
    lr_decay: str = "cosine"
    dim_z: int = 2  # latent size (PacGAN: 2)
    # Hidden widths. PacGAN: G [400] * 4, D [200] * 3 (maxout); smaller here so a cell stays within ~20 s on one
    # CPU thread. With an ERK mask the first and last layers (2 inputs or outputs) stay nearly dense, and the
    # hidden-to-hidden layers carry the sparsity.
    g_hidden: list[int] = field(default_factory=lambda: [128, 128, 128])
    d_hidden: list[int] = field(default_factory=lambda: [128, 128, 128])
    eval_samples: int = 2500  # generated samples scored at the end (the protocol's 2500)
    # The MLPs are all linear layers: the analogue of the authors' conv-only masks is masking every weight matrix.
    sparse: SparseConfig = field(default_factory=lambda: SparseConfig(targets="conv_linear"))

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        for name in ("steps", "batch_size", "dim_z", "eval_samples"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("g_lr", "d_lr"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.lr_decay in ("constant", "cosine"), f"lr_decay must be constant or cosine, got {self.lr_decay!r}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas}",
        )
        for name in ("g_hidden", "d_hidden"):
            widths = getattr(self, name)
            _check(bool(widths) and all(w >= 1 for w in widths), f"{name} must be a non-empty list of widths >= 1")
        _check(
            self.sparse.method != "prune_finetune",
            "sparse.method=prune_finetune is not offered here: the benchmark trains from scratch (no dense checkpoint)",
        )
        _check(
            self.sparse.targets == "conv_linear",
            "sparse.targets must be conv_linear here: the MLPs have no convolutions for conv_only to mask",
        )


def gaussians_config(settings: dict[str, Any]) -> GaussiansConfig:
    """A :class:`GaussiansConfig` from a plain dict, ``sparse`` a nested dict of :class:`SparseConfig` fields.

    Unknown keys (``"stepz"``, ``{"sparse": {"densty_g": ...}}``) and bad values raise :class:`ConfigError`."""
    if not isinstance(settings, dict):
        raise ConfigError(f"Gaussians settings must be a mapping, got {type(settings).__name__}")
    sparse = settings.get("sparse")
    if isinstance(sparse, dict) and "targets" not in sparse:  # the MLPs' only weights (see GaussiansConfig.sparse)
        settings = {**settings, "sparse": {"targets": "conv_linear", **sparse}}
    return _build(GaussiansConfig, settings, prefix="")


def config_yaml(cfg: GaussiansConfig) -> str:
    """The config as the YAML of ``run_dir/config.yaml``; ``gaussians_config(yaml.safe_load(...))`` rebuilds it."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------------
# Data and metrics (pure functions).


def mode_centers(dataset: str) -> torch.Tensor:
    """The mixture's means ``[K, 2]`` (float32): 8 on the unit circle from angle 0, or the 5x5 grid row by row."""
    if dataset == "ring8":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return torch.stack([angles.cos(), angles.sin()], dim=1).float()
    if dataset == "grid25":
        axis = torch.arange(-4.0, 5.0, 2.0)
        return torch.cartesian_prod(axis, axis)
    raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def mode_std(dataset: str) -> float:
    """Standard deviation of every (isotropic) mode."""
    if dataset not in DATASETS:
        raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return 0.01 if dataset == "ring8" else 0.05


def sample_real(dataset: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` samples ``[n, 2]`` of the mixture (equal weights), drawn from ``generator`` only."""
    centers = mode_centers(dataset)
    which = torch.randint(len(centers), (n,), generator=generator)
    return centers[which] + mode_std(dataset) * torch.randn(n, 2, generator=generator)


def mode_metrics(samples: torch.Tensor, dataset: str) -> dict[str, Any]:
    """The protocol's figures for generated ``samples`` ``[N, 2]`` (see the module docstring).

    Returns ``modes_covered`` (modes with >= 1 high-quality sample), ``modes_covered_20`` (>= 20),
    ``modes_total``, ``hq_rate``, ``reverse_kl`` and ``mode_counts`` (high-quality samples per mode, in the order
    of :func:`mode_centers`)."""
    if samples.ndim != 2 or samples.shape[1] != 2 or len(samples) == 0:
        raise ValueError(f"samples must have shape [N, 2] with N >= 1, got {tuple(samples.shape)}")
    centers = mode_centers(dataset).double()
    # float64: a sample exactly on a 3-std boundary must not flip with the float32 rounding of a distance.
    distance, nearest = torch.cdist(samples.detach().double().cpu(), centers).min(dim=1)
    high_quality = distance < HQ_STDS * mode_std(dataset)  # strict, as MetricLogger's `min_dis < dis_thre`
    counts = torch.bincount(nearest[high_quality], minlength=len(centers))
    share = torch.bincount(nearest, minlength=len(centers)).double() / len(samples)
    present = share > 0
    reverse_kl = float((share[present] * (share[present] * len(centers)).log()).sum())
    return {
        "modes_covered": int((counts >= 1).sum()),
        "modes_covered_20": int((counts >= STRICT_MIN_SAMPLES).sum()),
        "modes_total": len(centers),
        "hq_rate": float(high_quality.double().mean()),
        "reverse_kl": max(reverse_kl, 0.0),  # (rounding can leave -1e-17 for a perfectly balanced histogram)
        "mode_counts": counts.tolist(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Networks and training.


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers through ``widths`` with a ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for a, b in pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def build_networks(cfg: GaussiansConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """G ``[B, dim_z] -> [B, 2]`` and D ``[B, 2] -> [B, 1]`` (logits), initialised from ``cfg.seed``.

    PyTorch's default init draws from the global RNG; it is forked so that the caller's RNG state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = mlp([cfg.dim_z, *cfg.g_hidden, 2])
        discriminator = mlp([2, *cfg.d_hidden, 1])
    return generator, discriminator


@dataclass
class Trained:
    """What one run leaves behind, before it is written out."""

    generator: nn.Sequential
    masks: MaskManager
    train_flops: float  # training FLOPs of the run (sgtrain.flops conventions) at the densities of every step
    dense_flops: float  # the same for dense training of the same MLPs


def train_networks(cfg: GaussiansConfig) -> Trained:
    """Train G and D for ``cfg.steps`` G steps, the mask manager driven as in ``sgtrain/train.py``.

    Deterministic for a seed on CPU: initial weights from ``build_networks``, masks from the manager's integer-seeded
    generators, real samples and latents from one generator seeded with ``cfg.seed``."""
    G, D = build_networks(cfg)
    # foreach: one fused update per network instead of one per tensor (CPU defaults to the loop); the same update.
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.g_lr, betas=tuple(cfg.betas), foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.d_lr, betas=tuple(cfg.betas), foreach=True)
    masks = MaskManager(
        cfg.sparse,
        generator=G,
        discriminator=D,
        optimizers={"G": opt_g, "D": opt_d},
        total_steps=cfg.steps,
        seed=cfg.seed,
    )
    # Initial masks of a fresh run (dense: nothing; SNIP: dense until its first before_step reads a gradient).
    masks.initialize()
    # Forward FLOPs per sample of every Linear, once; a step's cost then follows the layers' current densities.
    g_layers = layer_forward_flops(G, torch.zeros(1, cfg.dim_z))
    d_layers = layer_forward_flops(D, torch.zeros(1, 2))

    def iteration_flops(g_densities: dict[str, float], d_densities: dict[str, float]) -> float:
        return layers_iteration_flops(
            g_layers,
            d_layers,
            g_densities,
            d_densities,
            batch_size=cfg.batch_size,
            d_steps=1,
            dense_weight_grads=dense_weight_gradients(cfg.sparse),
        )

    dense_iteration = iteration_flops({}, {})
    train_flops = 0.0
    rng = torch.Generator().manual_seed(cfg.seed)
    B = cfg.batch_size
    # The project's one GAN iteration, unconditional (no classes), with the non-saturating loss and no EMA: with
    # none, after_ema is never called and an update has no EMA copy to prune.
    gan = GanStep(G=LocalNetwork(G, opt_g), D=LocalNetwork(D, opt_d), masks=masks, losses=NON_SATURATING)

    def real() -> tuple[torch.Tensor, None]:
        return sample_real(cfg.dataset, B, rng) / DATA_SCALE[cfg.dataset], None

    def latents() -> tuple[torch.Tensor, None]:
        return torch.randn(B, cfg.dim_z, generator=rng), None

    for step in range(cfg.steps):
        if cfg.lr_decay == "cosine":  # (set on the param groups: no scheduler object, nothing to checkpoint)
            factor = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for opt, lr in ((opt_g, cfg.g_lr), (opt_d, cfg.d_lr)):
                for group in opt.param_groups:
                    group["lr"] = lr * factor
        gan(step, real, latents)
        # Maintenance: this iteration's FLOPs at the densities it ended with (as train.py counts them), so GMP, which
        # starts dense, pays for its dense phase and SNIP for its dense first step only in part.
        train_flops += iteration_flops(masks.layer_densities("G"), masks.layer_densities("D"))
    return Trained(G, masks, train_flops, dense_iteration * cfg.steps)


@torch.no_grad()
def generate(generator: nn.Module, cfg: GaussiansConfig) -> torch.Tensor:
    """``cfg.eval_samples`` samples ``[N, 2]``, in data units, from fixed latents (their own stream, apart from
    training's)."""
    z = torch.randn(cfg.eval_samples, cfg.dim_z, generator=torch.Generator().manual_seed(cfg.seed + 7919))
    return generator(z) * DATA_SCALE[cfg.dataset]


def train_gaussians(cfg: GaussiansConfig, run_dir: Path) -> dict[str, Any]:
    """Train one cell into ``run_dir`` and return its result (also in ``run_dir/result.json``).

    Writes ``config.yaml``, ``generator.pt`` (G's state dict, for re-scoring), ``samples.png`` and, last and
    atomically, ``result.json``: a cell holding one is complete, and is returned as it is without training. A
    ``run_dir`` whose ``config.yaml`` holds other settings raises :class:`ConfigError` rather than mixing them up.

    ``wall_s`` is the time of training and scoring, not of writing the files."""
    run_dir = Path(run_dir)
    text = config_yaml(cfg)
    saved = run_dir / "config.yaml"
    if saved.is_file() and saved.read_text() != text:
        raise ConfigError(f"{run_dir} holds a run of other settings (its config.yaml differs); use a new run_dir")
    if (run_dir / RESULT_FILE).is_file():
        return json.loads((run_dir / RESULT_FILE).read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, text.encode())

    start = time.perf_counter()
    trained = train_networks(cfg)
    samples = generate(trained.generator, cfg)
    metrics = mode_metrics(samples, cfg.dataset)
    wall_s = time.perf_counter() - start

    masks = trained.masks
    layers = {
        f"{net}.{layer.name}": {"active": int(layer.mask.sum()), "numel": layer.numel}
        for net in ("G", "D")
        for layer in masks.layers[net]
    }
    result = {
        "dataset": cfg.dataset,
        "method": cfg.sparse.method,
        "seed": cfg.seed,
        "steps": cfg.steps,
        **metrics,
        "density_g": masks.density("G"),
        "density_d": masks.density("D"),
        "itop_rate_g": masks.itop_rate("G"),
        "train_flops": trained.train_flops,
        "train_flops_vs_dense": trained.train_flops / trained.dense_flops,
        "wall_s": wall_s,
        "layers": layers,  # masked layers' active weights at the end (empty for dense)
    }
    buffer = io.BytesIO()
    torch.save(trained.generator.state_dict(), buffer)
    write_atomic(run_dir / "generator.pt", buffer.getvalue())
    _plot_samples(samples, cfg, result, run_dir / "samples.png")
    write_atomic(run_dir / RESULT_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _plot_samples(samples: torch.Tensor, cfg: GaussiansConfig, result: dict[str, Any], path: Path) -> None:
    # A bare Figure on an Agg canvas, never pyplot: no global backend or figure state in the calling process.
    figure = Figure(figsize=(5.0, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    points = samples.detach().cpu().numpy()
    centers = mode_centers(cfg.dataset).numpy()
    ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.3, linewidths=0, color="tab:blue", label="generated")
    ax.scatter(centers[:, 0], centers[:, 1], s=40, marker="x", color="tab:red", label="mode centres")
    limit = PLOT_LIMITS[cfg.dataset]
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    s = cfg.sparse
    densities = "" if s.method == "dense" else f" G {result['density_g']:.2f} / D {result['density_d']:.2f}"
    ax.set_title(
        f"{cfg.dataset}, {s.method}{densities}, seed {cfg.seed}\n"
        f"modes {result['modes_covered']}/{result['modes_total']}, HQ {100 * result['hq_rate']:.1f}%, "
        f"{len(points)} samples",
        fontsize="medium",
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
