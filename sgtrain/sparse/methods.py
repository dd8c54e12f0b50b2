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
from typing import Any, ClassVar

import torch

from sgtrain.config import ConfigError, SparseConfig
from sgtrain.sparse.balance import EXPLORE, GROW, HOLD, SHRINK, BalanceWindow, balance_ratios, next_density
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

    # What only some methods have: the balance ratio's samples (ADAPT), state beyond the masks, figures logged at
    # every record rather than at updates.
    balance_every: int = 0  # G iterations between balance-ratio samples (0: the method takes none)

    def observe_balance(self, means: torch.Tensor) -> None:
        """Take one balance-ratio sample: ``[3]`` global means of D's real, before and after logits."""

    def weighs_dense_layers(self, net: str) -> bool:
        """Whether this method can change layers the distribution made dense (they then get an owner's share)."""
        return False

    def status(self) -> dict[str, float]:
        """Figures logged in every metrics record (the balance ratio, say), identical on every rank."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the masks (a method without such state: empty)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], layers: Layers) -> None:
        """Restore :meth:`state_dict` after the masks of ``layers`` were loaded (may check them against it)."""


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
# ADAPT: D's density steered by the balance ratio.


# Decisions as numbers for the metrics records (which hold numbers only).
DECISION_CODES = {SHRINK: -1.0, HOLD: 0.0, GROW: 1.0, EXPLORE: 2.0}


class ADAPT(STU):
    """ADAPT (Wang et al., NeurIPS 2023; YiteWang/ADAPT, docs/adapt_reference.md): G trains sparse-to-sparse as in
    STU; D's density follows the balance ratio. Every ``sparse.adapt.sample_every`` iterations the step hands in one
    sample (global means of D's logits, so every rank holds the same window); every ``decide_every`` iterations,
    once the window is full, its ratio moves D's density by ``step`` (:func:`next_density`). A growth adds the
    inactive weights of largest grow score (D's last gradient), a shrink keeps the active weights of largest
    magnitude; under ``variant: strict`` at the cap D drops and regrows instead, at a cosine-decayed fraction.

    ``selection: global`` (the authors') picks over the whole network with one threshold, for D's changes and for
    G's drop-and-grow alike, through :meth:`Sharding.top_over_layers`; ``layer`` re-solves the layer-wise
    distribution at the new density and picks within each layer (STU's rule)."""

    def __init__(self, cfg: SparseConfig, *, seed: int, total_steps: int) -> None:
        super().__init__(cfg, seed=seed, total_steps=total_steps)
        self.adapt = cfg.adapt
        self.growth["D"] = GROWTH[cfg.adapt.grow]()
        self.balance_every = cfg.adapt.sample_every
        self.window = BalanceWindow(cfg.adapt.window)
        self.d_density = cfg.density_d  # on the step's grid (next_density rounds), so the strict cap is met exactly
        self.ratio: float | None = None  # the window's ratio at the latest decision
        self.decision = HOLD  # the latest decision
        self.decisions = 0
        self.dropped_samples = 0  # balance samples whose ratio was not finite
        self._pending: tuple[float, str] | None = None  # this step's decision, applied by update("D")
        # Strict at the cap: the authors' CosineDecay(0.5, eta_min=0.005) over the whole run.
        self.explore_schedule = UpdateSchedule(
            update_every=cfg.adapt.decide_every,
            update_end=1.0,
            drop_fraction=cfg.adapt.explore_drop_fraction,
            total_steps=total_steps,
            drop_fraction_min=cfg.adapt.explore_drop_fraction_min,
        )

    @property
    def global_selection(self) -> bool:
        return self.adapt.selection == "global"

    def is_decision_step(self, step: int) -> bool:
        """D's density is decided after G step ``step``: multiples of ``decide_every`` short of the last step (the
        authors skip the final step too)."""
        return 0 < step < self.total_steps and step % self.adapt.decide_every == 0

    def observe_balance(self, means: torch.Tensor) -> None:
        # A sample whose ratio is not finite (non-finite logits, or D scoring reals and fakes alike: a zero
        # denominator) would make every mean of the window NaN or infinite until it falls out; the authors' code
        # keeps it. The means are global, so every rank drops the same samples.
        if bool(torch.isfinite(balance_ratios(means.reshape(1, 3).double())).all()):
            self.window.add(means)
        else:
            self.dropped_samples += 1

    def weighs_dense_layers(self, net: str) -> bool:
        return net == "D" or self.global_selection

    def wants_gradient(self, layer: Layer, step: int) -> bool:
        if layer.net == "D":
            return self.growth["D"].wants_gradient(self.is_decision_step(step + 1))
        if not self.global_selection:
            return super().wants_gradient(layer, step)
        # One threshold over G: a layer the distribution made dense can lose weights and grow them back.
        update = self.schedule.is_update_step(step + 1) and step + 1 < self.total_steps
        return self.explores["G"] and self.growth["G"].wants_gradient(update)

    def check_engine(self) -> None:
        super().check_engine()
        if isinstance(self.growth["D"], MomentumGrowth):
            raise ConfigError("sparse.adapt.grow=momentum is not supported under DeepSpeed yet; use gradient")

    def due(self, step: int) -> tuple[str, ...]:
        # D is due at every decision step, whatever the decision: update("D") also releases the gradient kept for a
        # growth that did not happen. G does not explore after the last step (as in the authors' code: a weight
        # grown then would enter the final model at zero, untrained).
        nets = super().due(step) if step < self.total_steps else ()
        self._pending = None
        if not self.is_decision_step(step):
            return nets
        ratio = self.window.ratio()
        if ratio is None:
            return (*nets, "D")
        a = self.adapt
        density, decision = next_density(
            self.d_density,
            ratio,
            lower=a.lower,
            upper=a.upper,
            step=a.step,
            minimum=a.minimum,
            cap=a.highest,
            explore_at_cap=a.variant == "strict",
        )
        self.ratio, self.decision = ratio, decision
        self.decisions += 1
        self._pending = (density, decision)
        return (*nets, "D")

    def update(self, net: str, layers: list[Layer], step: int, sharding: Sharding) -> list[tuple[Layer, torch.Tensor]]:
        if net == "G":
            if not self.global_selection:
                return super().update(net, layers, step, sharding)
            fraction = self.schedule.drop_fraction_at(step)
            return self._drop_and_grow(net, layers, fraction, self.schedule.update_index(step), sharding)
        density, decision = self._pending or (self.d_density, HOLD)  # no decision yet: the window is not full
        self._pending = None
        changes: list[tuple[Layer, torch.Tensor]] = []
        if decision == EXPLORE:
            fraction = self.explore_schedule.drop_fraction_at(step)
            if self.global_selection:
                changes = self._drop_and_grow(net, layers, fraction, step, sharding)
            else:
                changes = self._layerwise_drop_and_grow(net, layers, fraction, step, sharding)
        elif decision != HOLD:
            self.d_density = density
            changes = self._resize(layers, density, step, sharding)
        for layer in layers:  # the gradient kept for this decision is used (or not needed) now
            self.growth["D"].after_update(layer)
        return changes

    def _scores(self, net: str, layers: list[Layer], update: int, sharding: Sharding) -> dict[int, torch.Tensor]:
        """Grow scores of the layers this rank selects for; a collective. A layer without a gradient (it took no
        part in the loss, on every rank alike) scores zero."""
        growth = self.growth[net]
        scored = [layer for layer in layers if growth.can_grow(layer)]
        reduced = growth.reduce(scored, sharding)
        scores = {}
        for layer in layers:
            if not growth.can_grow(layer):
                scores[layer.index] = torch.zeros_like(layer.param)
            elif layer.index in reduced or not isinstance(growth, GradientGrowth):
                scores[layer.index] = growth.score(layer, reduced, seed=self.seed, update=update)
        for layer in layers:
            growth.after_update(layer)
        return scores

    def _drop_and_grow(
        self, net: str, layers: list[Layer], fraction: float, update: int, sharding: Sharding
    ) -> list[tuple[Layer, torch.Tensor]]:
        """The authors' global drop-and-grow: drop the ``fraction * active`` active weights of smallest magnitude
        over the whole network, grow as many inactive ones (inactive before the update) of largest score."""
        active = sum(layer.count for layer in layers)
        k = min(drop_fraction_k(active, fraction), sum(layer.numel for layer in layers) - active)
        keep = sharding.top_over_layers(layers, lambda layer: (layer.mask, layer.param.abs()), active - k)
        scores = self._scores(net, layers, update, sharding)
        grow = sharding.top_over_layers(layers, lambda layer: (~layer.mask, scores[layer.index]), k)
        new = sharding.select(layers, lambda layer: (keep[layer.index] | grow[layer.index]).reshape(layer.mask.shape))
        return list(zip(layers, new, strict=True))

    def _layerwise_drop_and_grow(
        self, net: str, layers: list[Layer], fraction: float, update: int, sharding: Sharding
    ) -> list[tuple[Layer, torch.Tensor]]:
        layers = [layer for layer in layers if layer.count < layer.numel]
        scores = self._scores(net, layers, update, sharding)

        def select(layer: Layer) -> torch.Tensor:
            k = drop_fraction_k(layer.count, fraction)
            return drop_and_grow(layer.param, layer.mask, scores[layer.index], k)[0]

        return list(zip(layers, sharding.select(layers, select), strict=True))

    def _resize(
        self, layers: list[Layer], density: float, update: int, sharding: Sharding
    ) -> list[tuple[Layer, torch.Tensor]]:
        """D's masks at ``density``: grown by score or pruned by magnitude, over the network or layer by layer."""
        total = sum(layer.numel for layer in layers)
        target = round(density * total)
        if self.global_selection:
            active = sum(layer.count for layer in layers)
            if target >= active:
                scores = self._scores("D", layers, update, sharding)
                grow = sharding.top_over_layers(layers, lambda x: (~x.mask, scores[x.index]), target - active)
                new = sharding.select(layers, lambda x: x.mask | grow[x.index].reshape(x.mask.shape))
            else:
                keep = sharding.top_over_layers(layers, lambda x: (x.mask, x.param.abs()), target)
                new = sharding.select(layers, lambda x: keep[x.index].reshape(x.mask.shape))
            return list(zip(layers, new, strict=True))
        counts = self._layer_counts(layers, density)
        scores = self._scores("D", layers, update, sharding)

        def select(layer: Layer) -> torch.Tensor:
            count = counts[layer.name]
            if count <= layer.count:
                return _top_magnitude(layer.param, layer.mask, count)
            grown = torch.zeros(layer.numel, dtype=torch.bool, device=layer.mask.device)
            inactive = ~layer.mask.reshape(-1)
            grown[select_top(inactive, scores[layer.index].reshape(-1), count - layer.count, largest=True)] = True
            return layer.mask | grown.reshape(layer.mask.shape)

        return list(zip(layers, sharding.select(layers, select), strict=True))

    def _layer_counts(self, layers: list[Layer], density: float) -> dict[str, int]:
        """Each layer's active count under the configured distribution at overall ``density``."""
        dense = {layers[0].name, layers[-1].name} if self.cfg.dense_first_last and layers else set()
        return distribution_counts(self.cfg, layers, density, dense)

    def metrics(self, step: int) -> dict[str, float]:
        figures = super().metrics(step) if self.schedule.is_update_step(step) else {}
        if self.is_decision_step(step) and self.ratio is not None:
            figures["adapt/decision"] = DECISION_CODES[self.decision]
            if self.decision == EXPLORE:
                figures["adapt/explore_drop_fraction"] = self.explore_schedule.drop_fraction_at(step)
        return figures

    def status(self) -> dict[str, float]:
        figures = {"adapt/lower": self.adapt.lower, "adapt/upper": self.adapt.upper, "adapt/D_density": self.d_density}
        current = self.window.mean()
        if current is not None:  # the mean of the samples so far (the decisions wait for a full window)
            figures["adapt/balance_ratio"] = current
        if self.ratio is not None:
            figures["adapt/decided_ratio"] = self.ratio
        if self.dropped_samples:
            figures["adapt/dropped_samples"] = self.dropped_samples
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "d_density": self.d_density,
            "ratio": self.ratio,
            "decision": self.decision,
            "decisions": self.decisions,
            "dropped_samples": self.dropped_samples,
        }

    def load_state_dict(self, state: dict[str, Any], layers: Layers) -> None:
        if "window" not in state:
            raise ConfigError("the checkpoint holds no ADAPT state (balance window, D's density): not an ADAPT run")
        try:
            self.window.load_state_dict(state["window"])
        except ValueError as error:
            raise ConfigError(f"{error} (sparse.adapt.window changed?)") from None
        self.d_density = float(state["d_density"])
        self.ratio = None if state["ratio"] is None else float(state["ratio"])
        self.decision = str(state["decision"])
        self.decisions = int(state["decisions"])
        self.dropped_samples = int(state.get("dropped_samples", 0))
        a = self.adapt
        if not a.minimum - 1e-9 <= self.d_density <= a.highest + 1e-9:
            raise ConfigError(
                f"the checkpoint's D density {self.d_density} lies outside this run's ADAPT range [{a.minimum}, "
                f"{a.highest}] (sparse.adapt.minimum, cap or variant changed?)"
            )
        active = sum(layer.count for layer in layers["D"])
        total = sum(layer.numel for layer in layers["D"])
        # Once a global change has set D's density, D holds exactly its share (before, the distribution's counts).
        changed = self.d_density != self.cfg.density_d and self.cfg.adapt.selection == "global"
        if layers["D"] and changed and active != round(self.d_density * total):
            raise ConfigError(
                f"the checkpoint's D masks hold {active} of {total} weights, not its ADAPT density {self.d_density}"
            )


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
        counts = distribution_counts(self.cfg, layers, density, {layer.name for layer in layers if layer.density >= 1})

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
    "adapt": ADAPT,
}


def distribution_counts(cfg: SparseConfig, layers: list[Layer], density: float, dense: set[str]) -> dict[str, int]:
    """Each of ``layers``' active count under ``cfg``'s layer-wise distribution at overall ``density``, the layers
    named in ``dense`` kept dense."""
    shapes = {layer.name: tuple(layer.param.shape) for layer in layers}
    densities = layer_densities(shapes, density, kind=cfg.distribution, power=cfg.erk_power, dense=dense)
    return active_counts(shapes, densities)


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
