"""Sparse training methods as classes behind one small interface; :data:`METHODS` maps ``sparse.method`` to them.

A method decides the topology: the initial masks, whether a step's dense gradient feeds a score, when an update is
due and what the new masks are. The :class:`~sgtrain.sparse.manager.MaskManager` does the rest (enforcing masks,
optimizer state, EMA, checkpoints) and hands a method its :class:`Layer` lists and a
:class:`~sgtrain.sparse.sync.Sharding`, through which any update that selects on scores must go: the method says how
to select one layer, the sharding decides which rank does it and brings every rank the same bits. So a method knows
nothing about ranks. A new method is one class here plus its entry in :data:`METHODS` (and its config fields).

STU's growth modes differ only by their grow score (:class:`Growth`), as RigL differs from SET only in
``get_grow_scores`` (google-research/rigl, ``rigl_tf2/mask_updaters.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from sgtrain.config import ConfigError, SparseConfig
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.layers import NETWORKS, Layer
from sgtrain.sparse.schedule import UpdateSchedule, gmp_density
from sgtrain.sparse.sync import Sharding
from sgtrain.sparse.topology import (
    drop_and_grow,
    drop_fraction_k,
    layer_seed,
    random_mask,
    random_scores,
    select_top,
)

GRAD_MOMENTUM = 0.9  # momentum growth keeps its own EMA of dense gradients (Dettmers & Zettlemoyer 2019, beta 0.9)


Layers = Mapping[str, list[Layer]]  # by network, "G" then "D"


class SparseMethod:
    """A fixed topology: the base of every method. Subclasses override what they change.

    The manager calls, in a fresh run, ``initial_masks`` once; per optimizer step of ``net``, ``before_step`` and,
    for each layer with a gradient for which ``wants_gradient`` holds, ``take_gradient``; after each G step,
    ``due`` and, for every network it names, ``update``, then ``metrics``. Masks are replaced, never edited in place.
    """

    has_masks: ClassVar[bool] = True  # False: no weight is masked at all (dense training)
    starts_dense: ClassVar[bool] = False  # masks start all-ones, and the layers' counts at their numel
    wants_dense_weights: ClassVar[bool] = False  # initial masks are cut from a dense checkpoint's weights

    def __init__(self, cfg: SparseConfig, *, seed: int, total_steps: int) -> None:
        self.cfg = cfg
        # When updates are due and how much they swap: built for every method (it validates the config's values),
        # read by STU (GMP has its own schedule, gmp_density).
        self.schedule = UpdateSchedule(
            update_every=cfg.update_every,
            update_end=cfg.update_end,
            drop_fraction=cfg.drop_fraction,
            total_steps=total_steps,
            drop_fraction_min=cfg.drop_fraction_min,
        )
        self.seed = seed
        self.total_steps = total_steps
        self.target = {"G": cfg.density_g, "D": cfg.density_d}
        # Networks whose one-shot selection still waits for their first gradient (SNIP); checkpointed.
        self.one_shot_pending = {net: False for net in NETWORKS}

    def initial_masks(self, layers: Layers) -> None:
        """Set ``mask``, ``union`` (and ``count`` where it changes) of every layer; all-ones masks stay as built."""

    def check_engine(self) -> None:
        """Raise a ConfigError if the method cannot run under an engine that reads gradients in hooks."""

    def before_step(self, net: str, layers: list[Layer]) -> bool:
        """Between backward and the optimizer step, before scores are taken; True if it replaced masks."""
        return False

    def wants_gradient(self, layer: Layer, step: int) -> bool:
        """Whether the dense gradient of ``layer`` at G step ``step + 1`` feeds a grow score."""
        return False

    def take_gradient(self, layer: Layer, grad: torch.Tensor) -> None:
        """Take one step's dense gradient (weight-shaped, not yet masked) into ``layer.score``."""

    def due(self, step: int) -> tuple[str, ...]:
        """The networks whose topology changes after G step ``step`` (empty: no update)."""
        return ()

    def update(self, net: str, layers: list[Layer], step: int, sharding: Sharding) -> list[tuple[Layer, torch.Tensor]]:
        """New bool masks of (some of) ``layers``, identical on every rank; the manager applies them."""
        raise NotImplementedError

    def metrics(self, step: int) -> dict[str, float]:
        """Method-specific figures logged with an update."""
        return {}


class Dense(SparseMethod):
    """No masks: every weight trains."""

    has_masks = False


class Static(SparseMethod):
    """A random mask at each layer's density, drawn once and fixed (static sparse training)."""

    def initial_masks(self, layers: Layers) -> None:
        for net in NETWORKS:
            for layer in layers[net]:
                generator = torch.Generator().manual_seed(layer_seed(self.seed, 0, layer.index))
                layer.mask = random_mask(layer.param.shape, layer.count, generator).to(layer.param.device)
                layer.union = layer.mask.clone()


# --------------------------------------------------------------------------------------------------------------------
# STU: drop by magnitude, grow by a score.


class Growth:
    """How an STU update picks the inactive weights to grow: those of largest :meth:`score`. The modes differ by
    that score only, and by the gradients they keep for it."""

    def wants_gradient(self, before_update: bool) -> bool:
        """Whether a step's dense gradient is kept; ``before_update``: the step is the last before an update."""
        return False

    def take_gradient(self, layer: Layer, grad: torch.Tensor) -> None:
        """Take one step's dense gradient into ``layer.score``."""

    def can_grow(self, layer: Layer) -> bool:
        """Whether ``layer`` holds what its score needs (the same answer on every rank)."""
        return True

    def reduce(self, layers: list[Layer], sharding: Sharding) -> dict[int, torch.Tensor]:
        """What the owners need to score their layers, by layer index; a collective (every rank takes part)."""
        return {}

    def score(self, layer: Layer, reduced: dict[int, torch.Tensor], *, seed: int, update: int) -> torch.Tensor:
        """The grow score of ``layer`` (its weight's shape), larger is better; computed by the layer's owner."""
        raise NotImplementedError

    def after_update(self, layer: Layer) -> None:
        """``layer`` was updated."""


class RandomGrowth(Growth):
    """SET (Mocanu et al. 2018): uniform random scores from a generator seeded by ``(seed, update, layer)``."""

    def score(self, layer: Layer, reduced: dict[int, torch.Tensor], *, seed: int, update: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(layer_seed(seed, update, layer.index))
        return random_scores(layer.param.shape, generator).to(layer.param.device)


class GradientGrowth(Growth):
    """RigL: the largest |dense gradient| of the step before the update, summed over ranks where it is local."""

    def wants_gradient(self, before_update: bool) -> bool:
        return before_update

    def take_gradient(self, layer: Layer, grad: torch.Tensor) -> None:
        # The dense gradient, read before it is masked; signed, because local gradients of several ranks must be
        # summed before the magnitude is taken.
        layer.score = grad.clone()

    def can_grow(self, layer: Layer) -> bool:
        # A layer that took no part in the loss has no gradient (the same layers on every rank): left as it is.
        return layer.score is not None

    def reduce(self, layers: list[Layer], sharding: Sharding) -> dict[int, torch.Tensor]:
        return sharding.reduce_scores(layers)

    def score(self, layer: Layer, reduced: dict[int, torch.Tensor], *, seed: int, update: int) -> torch.Tensor:
        return reduced[layer.index].abs()  # |gradient summed over ranks| (or |momentum|)

    def after_update(self, layer: Layer) -> None:
        layer.score = None  # consumed: the next update reads the gradient of the step before it


class MomentumGrowth(GradientGrowth):
    """The largest |EMA of every step's dense gradient| (beta :data:`GRAD_MOMENTUM`), kept across updates."""

    def wants_gradient(self, before_update: bool) -> bool:
        return True

    def take_gradient(self, layer: Layer, grad: torch.Tensor) -> None:
        if layer.score is None:
            layer.score = torch.zeros_like(layer.param)
        layer.score.mul_(GRAD_MOMENTUM).add_(grad, alpha=1 - GRAD_MOMENTUM)

    def after_update(self, layer: Layer) -> None:
        pass


GROWTH: dict[str, type[Growth]] = {"gradient": GradientGrowth, "random": RandomGrowth, "momentum": MomentumGrowth}


class STU(Static):
    """Sparse-to-sparse training (STU-GAN; RigL / SET updates): a static random start, then every ``update_every``
    G steps until ``update_end``, each exploring network drops the ``k = d_t * nnz`` active weights of smallest
    magnitude in every sparse layer and grows ``k`` inactive ones by its growth mode's score."""

    def __init__(self, cfg: SparseConfig, *, seed: int, total_steps: int) -> None:
        super().__init__(cfg, seed=seed, total_steps=total_steps)
        self.explores = {"G": cfg.explore in ("G", "GD"), "D": cfg.explore in ("D", "GD")}
        self.growth = {"G": GROWTH[cfg.grow_g](), "D": GROWTH[cfg.grow_d]()}

    def check_engine(self) -> None:
        if any(self.explores[net] and isinstance(self.growth[net], MomentumGrowth) for net in NETWORKS):
            # Each rank's momentum would be its own (local scores), and a checkpoint holds rank 0's only: a resume
            # could not continue the sum over ranks exactly.
            raise ConfigError("sparse.grow_g/grow_d=momentum is not supported under DeepSpeed yet; use gradient")

    def wants_gradient(self, layer: Layer, step: int) -> bool:
        # Only for layers an update can change: a dense layer's gradient would never be read, yet would be carried
        # (and checkpointed) for the rest of the run.
        if not self.explores[layer.net] or layer.density >= 1.0:
            return False
        return self.growth[layer.net].wants_gradient(self.schedule.is_update_step(step + 1))

    def take_gradient(self, layer: Layer, grad: torch.Tensor) -> None:
        self.growth[layer.net].take_gradient(layer, grad)

    def due(self, step: int) -> tuple[str, ...]:
        return tuple(net for net in NETWORKS if self.explores[net]) if self.schedule.is_update_step(step) else ()

    def update(self, net: str, layers: list[Layer], step: int, sharding: Sharding) -> list[tuple[Layer, torch.Tensor]]:
        fraction = self.schedule.drop_fraction_at(step)
        update = self.schedule.update_index(step)
        growth = self.growth[net]
        # A dense layer has nothing inactive to grow.
        layers = [layer for layer in layers if layer.density < 1.0 and growth.can_grow(layer)]
        reduced = growth.reduce(layers, sharding)

        def select(layer: Layer) -> torch.Tensor:
            score = growth.score(layer, reduced, seed=self.seed, update=update)
            return drop_and_grow(layer.param, layer.mask, score, drop_fraction_k(layer.count, fraction))[0]

        new = sharding.select(layers, select)
        for layer in layers:
            growth.after_update(layer)
        return list(zip(layers, new, strict=True))

    def metrics(self, step: int) -> dict[str, float]:
        return {"sparse/drop_fraction": self.schedule.drop_fraction_at(step)}


# --------------------------------------------------------------------------------------------------------------------
# Baselines that prune: SNIP, GMP, prune-and-finetune.


class SNIP(SparseMethod):
    """SNIP (Lee et al. 2019): dense until the first gradient, then keep the ``density * total`` weights of
    largest |w * g|, one threshold over the network; fixed afterwards."""

    starts_dense = True

    def __init__(self, cfg: SparseConfig, *, seed: int, total_steps: int) -> None:
        super().__init__(cfg, seed=seed, total_steps=total_steps)
        self.one_shot_pending = {net: True for net in NETWORKS}

    def check_engine(self) -> None:
        raise ConfigError("sparse.method=snip is not supported under DeepSpeed yet (it reads whole gradients)")

    def before_step(self, net: str, layers: list[Layer]) -> bool:
        if not self.one_shot_pending[net]:
            return False
        scores = [
            (layer.param * layer.param.grad).abs() if layer.param.grad is not None else torch.zeros_like(layer.param)
            for layer in layers
        ]
        _keep_global_top(layers, scores, self.target[net])
        for layer in layers:
            layer.union = layer.mask.clone()
        self.one_shot_pending[net] = False
        return True


class GMP(SparseMethod):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense until ``gmp_start``, then every ``update_every`` G steps
    each layer keeps its largest-magnitude weights at the cubic schedule's density, reaching the target at
    ``gmp_end``. The layer-wise distribution is re-solved at each density; pruning only removes."""

    starts_dense = True

    def _span(self) -> tuple[int, int]:
        return round(self.cfg.gmp_start * self.total_steps), round(self.cfg.gmp_end * self.total_steps)

    def due(self, step: int) -> tuple[str, ...]:
        start, end = self._span()
        return NETWORKS if start <= step <= end and (step % self.cfg.update_every == 0 or step == end) else ()

    def update(self, net: str, layers: list[Layer], step: int, sharding: Sharding) -> list[tuple[Layer, torch.Tensor]]:
        start, end = self._span()
        density = gmp_density(step, initial_density=1.0, final_density=self.target[net], start_step=start, end_step=end)
        shapes = {layer.name: tuple(layer.param.shape) for layer in layers}
        dense = {layer.name for layer in layers if layer.density >= 1.0}
        densities = layer_densities(shapes, density, kind=self.cfg.distribution, power=self.cfg.erk_power, dense=dense)
        counts = active_counts(shapes, densities)

        def select(layer: Layer) -> torch.Tensor:
            return _top_magnitude(layer.param, layer.mask, min(counts[layer.name], layer.count))  # only removes

        return list(zip(layers, sharding.select(layers, select), strict=True))


class PruneFinetune(SparseMethod):
    """Prune a dense checkpoint's weights by magnitude (``prune_scope``: one threshold per network, or each layer
    to the distribution's count), then fine-tune on the fixed topology. The manager loads the weights first."""

    wants_dense_weights = True

    def initial_masks(self, layers: Layers) -> None:
        for net in NETWORKS:
            if self.cfg.prune_scope == "global":
                # One magnitude threshold over the whole network: exactly round(density * total) survive.
                _keep_global_top(layers[net], [layer.param.detach().abs() for layer in layers[net]], self.target[net])
            else:
                for layer in layers[net]:
                    layer.mask = _top_magnitude(layer.param, torch.ones_like(layer.mask), layer.count)
            for layer in layers[net]:
                layer.union = layer.mask.clone()


# The one place that maps ``sparse.method`` to a method (config.SPARSE_METHODS lists the same names for validation).
METHODS: dict[str, type[SparseMethod]] = {
    "dense": Dense,
    "static": Static,
    "stu": STU,
    "snip": SNIP,
    "gmp": GMP,
    "prune_finetune": PruneFinetune,
}


def _keep_global_top(layers: list[Layer], scores: list[torch.Tensor], density: float) -> None:
    """Set the layers' masks to the ``round(density * total)`` largest scores over all of them (ties to the lower
    index, layers in order), so one threshold decides for the whole network and per-layer densities follow."""
    flat = torch.cat([score.detach().reshape(-1) for score in scores])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[select_top(torch.ones_like(chosen), flat, round(density * flat.numel()), largest=True)] = True
    for layer, part in zip(layers, chosen.split([layer.numel for layer in layers]), strict=True):
        layer.mask = part.reshape(layer.param.shape)
        layer.count = int(layer.mask.sum())


def _top_magnitude(param: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` entries of largest |param| among ``allowed`` ones (ties to the lower index), as a bool mask."""
    mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    mask[select_top(allowed.reshape(-1), param.detach().abs().reshape(-1), count, largest=True)] = True
    return mask.reshape(param.shape)
