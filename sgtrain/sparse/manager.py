"""The mask manager: the one stateful object of sparse training, a thin shell around the methods and pure functions.

The training loop calls, per optimizer step of network ``net`` ("G" or "D")::

    loss.backward(); masks.before_step(net); opt.step(); masks.after_step(net)

and after each G step ``ema.update(G); masks.after_ema(ema.module); masks.maybe_update(step)``. What the topology is
and when it changes belongs to the ``sparse.method``'s class (``sgtrain/sparse/methods.py``); the manager holds the
layers and enforces their masks on weights, gradients, optimizer state and the EMA, and checkpoints them. Nothing in
this package talks to torch.distributed: the manager is handed a :class:`~sgtrain.sparse.sync.Comm`, and its
:class:`~sgtrain.sparse.sync.Sharding` assigns owners, reduces scores, broadcasts the new masks and compares
checksums. Nor does it know the models: any ``nn.Module`` pair works (see :func:`masked_parameters`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sgtrain.comm import Comm, LocalComm
from sgtrain.config import ConfigError, SparseConfig
from sgtrain.sparse.balance import global_means
from sgtrain.sparse.layers import (
    NETWORKS,
    Layer,
    build_layers,
    layer_state,
    load_dense_weights,
    load_layer_state,
    masked_parameters,
)
from sgtrain.sparse.methods import GRAD_MOMENTUM, METHODS, SparseMethod
from sgtrain.sparse.sync import MaskDivergenceError, Sharding
from sgtrain.sparse.topology import seed_second_moment

__all__ = [
    "GRAD_MOMENTUM",
    "NETWORKS",
    "Layer",
    "MaskDivergenceError",
    "MaskManager",
    "StateEdit",
    "masked_parameters",
    "seed_second_moment",
]

# Edits one tensor of a weight's state, given whole: ``edit(key, tensor) -> new tensor`` for the key "param" (the
# weight, or an engine's fp32 master copy of it) and every per-element optimizer slot ("exp_avg", "exp_avg_sq", ...).
StateEdit = Callable[[str, torch.Tensor], torch.Tensor]


class MaskManager:
    """Masks of G and D for ``cfg.method`` (one of :data:`~sgtrain.sparse.methods.METHODS`; ``dense`` masks
    nothing)."""

    def __init__(
        self,
        cfg: SparseConfig,
        *,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        total_steps: int,
        seed: int,
        comm: Comm | None = None,
        local_scores: bool = False,
        sharded: bool = True,
    ) -> None:
        """``comm``: the run's collectives (one process if None). ``local_scores``: the gradients this rank reads are
        its own, not averaged over ranks (no DDP, ZeRO-partitioned or hook-captured gradients), so they are summed
        across ranks before selection. ``sharded=False`` is the naive scheme kept for the benchmark: every rank
        selects every layer itself (after an all-reduce of local scores)."""
        self.cfg = cfg
        self.seed = seed
        self.total_steps = total_steps
        self.optimizers = optimizers
        self.comm: Comm = comm if comm is not None else LocalComm()
        self.sharding = Sharding(self.comm, local_scores=local_scores, sharded=sharded)
        self.hooked = False  # gradients read in autograd hooks (attach_to_engine) rather than in before_step
        # "dense": Adam steps every weight on its full gradient and inactive weights are re-masked after each step
        # (the authors'); "masked": gradients of inactive weights are zeroed too, so their moments stay zero.
        self.masked_gradients = cfg.optimizer_state == "masked"
        # How a grown weight's second moment starts in masked mode: "seeded" (see seed_second_moment) or "zero",
        # the behaviour before it was fixed, kept only so the benchmark can show what it did.
        self.grown_moments = "seeded"
        # Applies ``edit`` to a weight's optimizer state (and an engine's master copy): ``(net, param, edit)``.
        # Under an engine a collective, called by every rank for the same weights in the same order.
        self.edit_state: Callable[[str, nn.Parameter, StateEdit], None] = self._edit_torch_state
        # Under an engine in dense mode: re-masks the fp32 master copies of these layers (a local operation).
        self.mask_master: Callable[[str, list[Layer]], None] | None = None
        self.step = 0  # completed G steps
        self.last_change: dict[str, float] = {}
        self.ema_params: dict[str, nn.Parameter] = {}  # the EMA generator's weights, known after the first after_ema
        self.method: SparseMethod = METHODS[cfg.method](cfg, seed=seed, total_steps=total_steps)
        self.schedule = self.method.schedule
        self.modules = {"G": generator, "D": discriminator}
        self.layers: dict[str, list[Layer]] = {net: [] for net in NETWORKS}
        if not self.method.has_masks:
            return
        self.layers = build_layers(self.modules, cfg, self.method.target, start_dense=self.method.starts_dense)
        for net in NETWORKS:
            self.sharding.assign_owners(self.layers[net], every_layer=self.method.weighs_dense_layers(net))

    @property
    def wants_dense_weights(self) -> bool:
        """Whether :meth:`initialize` needs a dense checkpoint's weights (``sparse.method=prune_finetune``)."""
        return self.method.wants_dense_weights

    @property
    def balance_every(self) -> int:
        """G iterations between the balance-ratio samples the method takes (ADAPT; 0: none)."""
        return self.method.balance_every

    def observe_balance(self, real: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> None:
        """One balance-ratio sample from this rank's D logits of the last real batch and of the G step's fakes before
        and after it (``GanStep``'s ``on_balance``). A collective: the means are over the global batch, so every rank
        keeps the same window and takes the same decision."""
        self.method.observe_balance(global_means(real, before, after, self.comm))

    def status(self) -> dict[str, float]:
        """Figures for every metrics record: each network's density, and the method's own (ADAPT's balance ratio and
        bounds). Identical on every rank."""
        figures = {f"sparse/{net}_density": self.density(net) for net in NETWORKS if self.layers[net]}
        figures.update(self.method.status())
        return figures

    @property
    def snip_pending(self) -> dict[str, bool]:
        """Networks whose SNIP pruning still waits for their first gradient (all False for other methods)."""
        return dict(self.method.one_shot_pending)

    # ----------------------------------------------------------------------------------------------------------------
    # Start of a run.

    def initialize(self, dense_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Draw the initial masks of a fresh run (not called on resume, where ``load_state_dict`` restores them).

        ``dense_weights``: ``{"G": state_dict, "D": state_dict}`` of a dense run to prune, loaded into the networks
        first; required exactly when :attr:`wants_dense_weights` (read it with ``sgtrain.checkpoint.read_pretrained``).
        """
        if self.method.wants_dense_weights:
            if dense_weights is None:
                raise ConfigError(
                    f"sparse.method={self.cfg.method} prunes a dense checkpoint: the training setup must read "
                    "sparse.prune_from (sgtrain.checkpoint.read_pretrained) and pass it to initialize()"
                )
            load_dense_weights(self.modules, dense_weights, source=self.cfg.prune_from)
        elif dense_weights is not None:
            raise ValueError(f"sparse.method={self.cfg.method} does not start from dense weights")
        self.method.initial_masks(self.layers)
        with torch.no_grad():
            for layer in self._all_layers():
                layer.ema_mask = layer.mask.clone()
                layer.param.mul_(layer.mask)

    # ----------------------------------------------------------------------------------------------------------------
    # Every optimizer step.

    @torch.no_grad()
    def before_step(self, net: str) -> None:
        """Between backward and ``opt.step()``: read dense gradients for grow scores, then, in masked mode, mask the
        gradients (in dense mode Adam sees them whole, as in the authors' code).

        Attached to an engine (:meth:`attach_to_engine`), the hooks have kept the dense gradients of this step for
        the scores (and, in masked mode, masked the engine's); what is left is to take those into the scores.
        """
        layers = self.layers[net]
        if not layers:
            return
        if self.method.before_step(net, layers):  # SNIP's one-shot pruning at the first gradient
            for layer in layers:
                layer.param.mul_(layer.mask)
        for layer in layers:
            grad = layer.pending if self.hooked else layer.param.grad
            layer.pending = None
            if grad is not None and self.method.wants_gradient(layer, self.step):
                self.method.take_gradient(layer, grad)
        if self.masked_gradients and not self.hooked:
            with_grad = [layer for layer in layers if layer.param.grad is not None]
            if with_grad:
                torch._foreach_mul_([layer.param.grad for layer in with_grad], [layer.fmask for layer in with_grad])

    def attach_to_engine(
        self,
        edit_state: Callable[[str, nn.Parameter, StateEdit], None],
        mask_master: Callable[[str, list[Layer]], None],
    ) -> None:
        """Work with an engine that consumes gradients during backward and owns the optimizer state (DeepSpeed
        ZeRO-1/2): by the time ``before_step`` runs, the gradients are reduced, partitioned and applied.

        Gradients are then read (and, in masked mode, masked) in autograd hooks, as each accumulation round produces
        them and before the engine sees them; the dense gradients of a step are summed there for the grow scores,
        which are this rank's own and so are summed across ranks at an update (``local_scores``). Topology changes
        edit optimizer state through ``edit_state(net, param, edit)``, a collective that every rank calls for the
        same weights in the same order. In dense mode the engine's fp32 master copies are re-masked after every
        step by ``mask_master(net, layers)`` (the engine copies its masters back into the weights, so re-masking the
        weights alone would let inactive weights return). Call before the engine is built. SNIP reads whole
        gradients at its first step and is not supported here.
        """
        self.method.check_engine()
        self.hooked = True
        self.sharding.local_scores = True
        self.edit_state = edit_state
        self.mask_master = mask_master
        for layer in self._all_layers():
            layer.param.register_hook(functools.partial(self._gradient_hook, layer))

    def _gradient_hook(self, layer: Layer, grad: torch.Tensor) -> torch.Tensor:
        if self.method.wants_gradient(layer, self.step):
            layer.pending = grad.detach().clone() if layer.pending is None else layer.pending + grad.detach()
        return grad * layer.fmask if self.masked_gradients else grad

    @torch.no_grad()
    def after_step(self, net: str) -> None:
        """After ``opt.step()``: re-mask the weights (in dense mode Adam moved inactive weights; in masked mode the
        optimizer's epsilon and any weight decay must not leak), and an engine's master copies in dense mode."""
        layers = self.layers[net]
        if layers:
            torch._foreach_mul_([layer.param for layer in layers], [layer.fmask for layer in layers])
            self._mask_masters(net, layers)

    def _mask_masters(self, net: str, layers: list[Layer]) -> None:
        """Dense mode under an engine: re-mask its fp32 master copies of ``layers`` (masked mode keeps them zero)."""
        if self.mask_master is not None and not self.masked_gradients:
            self.mask_master(net, layers)

    @torch.no_grad()
    def after_ema(self, ema_generator: nn.Module) -> None:
        """Sparse EMA: mask the EMA with G's mask; positions that became active since the last call take G's value."""
        if not self.layers["G"]:
            return
        if not self.ema_params:
            self.ema_params = dict(ema_generator.named_parameters())
        for layer in self.layers["G"]:
            # Masks are replaced, never edited in place, so identity means "unchanged since the EMA last saw it".
            # Then there is nothing to do: inactive weights are 0 in G and in the EMA, and the EMA's lerp keeps 0.
            if layer.ema_mask is layer.mask:
                continue
            target = self.ema_params[f"{layer.name}.weight"]
            new = layer.mask & ~layer.ema_mask
            target.copy_(torch.where(new, layer.param, target * layer.mask))
            layer.ema_mask = layer.mask

    # ----------------------------------------------------------------------------------------------------------------
    # Topology changes.

    @torch.no_grad()
    def maybe_update(self, step: int) -> dict[str, float]:
        """After G step ``step``: run the method's topology change if one is due; returns metrics to log."""
        self.step = step
        nets = self.method.due(step)
        if not nets:
            return {}
        entering = self.sharding.checksums(self._all_layers())
        for net in nets:
            self._replace_masks(net, self.method.update(net, self.layers[net], step, self.sharding))
        self.sharding.check_consistent(self._all_layers(), entering, f"at the topology update after step {step}")
        metrics = {}
        for net in NETWORKS:
            metrics[f"sparse/{net}_density"] = self.density(net)
            metrics[f"sparse/{net}_itop_rate"] = self.itop_rate(net)
            if net in self.last_change:
                metrics[f"sparse/{net}_mask_change"] = self.last_change[net]
        metrics.update(self.method.metrics(step))
        return metrics

    def _replace_masks(self, net: str, changes: list[tuple[Layer, torch.Tensor]]) -> None:
        """Apply an update's new masks (bool, identical on every rank) to the weights, the EMA, optimizer state and
        an engine's master copies; ``last_change`` is the fraction of active weights dropped."""
        dropped_total = active = 0
        for layer, new_mask in changes:
            grown = new_mask & ~layer.mask
            dropped = layer.mask & ~new_mask
            changed = grown | dropped
            # Dropped weights leave and grown weights enter at zero (in dense mode both are zero already, but a
            # dropped one is not). In dense mode Adam's moments are left as they are: a grown weight's are warm, as
            # in the authors' code. In masked mode the slots of both are cleared, and a grown weight's second moment
            # is seeded, so that its first steps are of the size Adam gives a warm weight.
            layer.param.masked_fill_(changed, 0.0)
            self._drop_from_ema(layer, changed)
            if self.masked_gradients:
                self._reset_state(layer, changed, grown, kept=new_mask & layer.mask)
            dropped_total += int(dropped.sum())  # drop-and-grow grows as many as it drops; pruning only drops
            active += layer.count
            layer.mask, layer.count = new_mask, int(new_mask.sum())
            layer.union |= new_mask
        self._mask_masters(net, [layer for layer, _ in changes])
        self.last_change[net] = dropped_total / max(active, 1)

    def _reset_state(self, layer: Layer, changed: torch.Tensor, grown: torch.Tensor, *, kept: torch.Tensor) -> None:
        """Masked mode: clear every optimizer slot (and an engine's master copy) of ``layer`` at ``changed``; seed
        the second moment at ``grown`` (see :func:`seed_second_moment`) unless ``grown_moments`` is "zero"."""
        if not bool(changed.any()):
            return  # the same answer on every rank (identical masks), so skipping a collective edit is safe
        seed = self.grown_moments == "seeded" and bool(grown.any())

        def edit(key: str, value: torch.Tensor) -> torch.Tensor:
            value = value.masked_fill(changed.to(value.device), 0.0)
            if key == "exp_avg_sq" and seed:
                value = seed_second_moment(value, grown=grown.to(value.device), kept=kept.to(value.device))
            return value

        self.edit_state(layer.net, layer.param, edit)

    def _edit_torch_state(self, net: str, param: nn.Parameter, edit: StateEdit) -> None:
        """``edit`` every per-element slot of ``param`` in the torch optimizer (Adam's exp_avg and exp_avg_sq,
        momentum); there is no master copy, and the manager edits the weight itself."""
        for key, value in self.optimizers[net].state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.copy_(edit(key, value))

    def _drop_from_ema(self, layer: Layer, removed: torch.Tensor) -> None:
        """Removed G weights leave the EMA at once, so a sample or checkpoint taken right after an update already
        uses G's new topology; grown ones still take G's value at the next ``after_ema``."""
        if layer.net == "G" and self.ema_params:
            self.ema_params[f"{layer.name}.weight"].masked_fill_(removed, 0.0)

    def check_identical(self, when: str) -> None:
        """Stop on every rank if the ranks hold different masks (after drawing or loading them, say)."""
        self.sharding.check_identical(self._all_layers(), when)

    # ----------------------------------------------------------------------------------------------------------------
    # Reporting and checkpoints.

    def _all_layers(self) -> list[Layer]:
        return [layer for net in NETWORKS for layer in self.layers[net]]

    def density(self, net: str) -> float:
        layers = self.layers[net]
        return sum(layer.count for layer in layers) / max(sum(layer.numel for layer in layers), 1) if layers else 1.0

    def itop_rate(self, net: str) -> float:
        """In-time over-parameterisation: the fraction of masked weights that have ever been active."""
        layers = self.layers[net]
        if not layers:
            return 1.0
        return sum(int(layer.union.sum()) for layer in layers) / sum(layer.numel for layer in layers)

    def layer_densities(self, net: str) -> dict[str, float]:
        """Current density of every masked layer of ``net`` by qualified name (for FLOPs accounting)."""
        return {layer.name: layer.count / layer.numel for layer in self.layers[net]}

    def state_dict(self) -> dict[str, Any]:
        """Method, step, SNIP's pending flags, every layer's :func:`~sgtrain.sparse.layers.layer_state` and the
        method's own state (ADAPT's balance window and D's density)."""
        layers = {f"{layer.net}.{layer.name}": layer_state(layer) for layer in self._all_layers()}
        return {
            "method": self.cfg.method,
            "step": self.step,
            "snip_pending": self.snip_pending,
            "layers": layers,
            "method_state": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", "dense") != self.cfg.method:
            raise ConfigError(
                f"the checkpoint was trained with sparse.method={state.get('method', 'dense')}, not {self.cfg.method}"
            )
        self.step = int(state["step"])
        self.method.one_shot_pending = {net: bool(state["snip_pending"][net]) for net in NETWORKS}
        saved = state["layers"]
        expected = {f"{layer.net}.{layer.name}" for layer in self._all_layers()}
        if set(saved) != expected:
            raise ConfigError("the checkpoint's masks cover other layers than this model's (sparse.targets changed?)")
        for layer in self._all_layers():
            load_layer_state(layer, saved[f"{layer.net}.{layer.name}"])
        # (checkpoints written before methods had state hold none; only ADAPT needs one, and it came later)
        self.method.load_state_dict(state.get("method_state", {}), self.layers)
