"""The mask manager: the one stateful object of sparse training, a thin shell around the pure functions.

The training loop calls, per optimizer step of network ``net`` ("G" or "D")::

    loss.backward(); masks.before_step(net); opt.step(); masks.after_step(net)

and after each G step ``ema.update(G); masks.after_ema(ema.module); masks.maybe_update(step)``. Everything else
(which tensors are masked, their densities, the schedule, the baselines) lives here. Nothing in this module talks
to torch.distributed: it is handed a :class:`~sgtrain.sparse.sync.Comm`. Under DDP the gradients it reads are already
averaged over ranks; where they are not (``local_scores``), it sums them onto each layer's owner itself. Owners compute
the new masks of their layers and broadcast them bit-packed; random growth comes from integer-seeded generators; after
every update the ranks compare mask checksums (``sgtrain/sparse/sync.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgtrain.config import ConfigError, SparseConfig
from sgtrain.models.layers import ConditionalBatchNorm2d
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.schedule import UpdateSchedule, gmp_density
from sgtrain.sparse.sync import Comm, LocalComm, MaskDivergenceError, assert_identical, assign_owners
from sgtrain.sparse.topology import (
    drop_and_grow,
    drop_fraction_k,
    layer_seed,
    mask_checksum,
    pack_mask,
    random_mask,
    random_scores,
    select_top,
    unpack_mask,
)

NETWORKS = ("G", "D")
GRAD_MOMENTUM = 0.9  # momentum growth keeps its own EMA of dense gradients (Dettmers & Zettlemoyer 2019, beta 0.9)

__all__ = ["MaskDivergenceError", "MaskManager", "StateEdit", "masked_parameters", "seed_second_moment"]

# Edits one tensor of a weight's state, given whole: ``edit(key, tensor) -> new tensor`` for the key "param" (the
# weight, or an engine's fp32 master copy of it) and every per-element optimizer slot ("exp_avg", "exp_avg_sq", ...).
StateEdit = Callable[[str, torch.Tensor], torch.Tensor]


def masked_parameters(module: nn.Module, targets: str) -> list[tuple[str, nn.Parameter]]:
    """The weights sparse training masks, in module order: conv (and, for ``conv_linear``, linear) weights.

    Embeddings, norm gains and biases stay dense (DESIGN.md, "Targets"); the class-conditional BN's gain and bias
    projections are linear layers, but they produce norm gains, so they stay dense too. Under spectral norm the
    masked tensor is the raw ``weight`` that SN normalises.
    """
    norm_prefixes = tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, ConditionalBatchNorm2d))
    kinds = (nn.Conv2d, nn.Linear) if targets == "conv_linear" else (nn.Conv2d,)
    return [
        (name, m.weight)
        for name, m in module.named_modules()
        if isinstance(m, kinds) and not name.startswith(norm_prefixes)
    ]


@dataclass
class Layer:
    """One masked weight tensor and its bookkeeping."""

    net: str  # "G" or "D"
    name: str  # qualified name in its network, e.g. "blocks.0.conv1"
    index: int  # position over G's then D's layers: one of the integers seeding this layer's RNG
    param: nn.Parameter
    density: float  # target density from the layer-wise distribution
    count: int  # active weights, constant over the run except under GMP / SNIP
    mask: torch.Tensor = field(repr=False)  # bool, the weight's shape and device
    union: torch.Tensor = field(repr=False)  # ITOP: every position ever active
    ema_mask: torch.Tensor | None = field(default=None, repr=False)  # the mask the EMA saw last (G only)
    score: torch.Tensor | None = field(default=None, repr=False)  # signed gradient (or momentum) for the next update
    owner: int = 0  # the rank that computes this layer's topology updates
    pending: torch.Tensor | None = field(default=None, repr=False)  # this step's dense gradient, summed in hooks

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "mask":
            # The per-step multiplies use a float copy: multiplying by a bool tensor makes a temporary float copy of
            # it on every call (CPU), which cost more than the multiply itself. Masks are replaced, never edited.
            super().__setattr__("fmask", value.to(self.param.dtype))

    @property
    def numel(self) -> int:
        return self.param.numel()


class MaskManager:
    """Masks of G and D for ``cfg.method`` in {static, stu, snip, gmp, prune_finetune} (``dense`` masks nothing)."""

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
        self.local_scores = local_scores
        self.sharded = sharded
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
        self.snip_pending = {net: cfg.method == "snip" for net in NETWORKS}
        self.last_change: dict[str, float] = {}
        self.ema_params: dict[str, nn.Parameter] = {}  # the EMA generator's weights, known after the first after_ema
        self.schedule = UpdateSchedule(
            update_every=cfg.update_every,
            update_end=cfg.update_end,
            drop_fraction=cfg.drop_fraction,
            total_steps=total_steps,
            drop_fraction_min=cfg.drop_fraction_min,
        )
        self.explores = {
            "G": cfg.method == "stu" and cfg.explore in ("G", "GD"),
            "D": cfg.method == "stu" and cfg.explore in ("D", "GD"),
        }
        self.grow = {"G": cfg.grow_g, "D": cfg.grow_d}
        self.target = {"G": cfg.density_g, "D": cfg.density_d}
        self.modules = {"G": generator, "D": discriminator}
        self.layers: dict[str, list[Layer]] = {}
        if cfg.method == "dense":
            self.layers = {net: [] for net in NETWORKS}
            return
        index = 0
        for net in NETWORKS:
            named = masked_parameters(self.modules[net], cfg.targets)
            shapes = {name: tuple(p.shape) for name, p in named}
            dense = {named[0][0], named[-1][0]} if cfg.dense_first_last else set()
            final = layer_densities(shapes, self.target[net], kind=cfg.distribution, power=cfg.erk_power, dense=dense)
            # SNIP and GMP start dense; the others start at their final density.
            start_dense = cfg.method in ("snip", "gmp")
            densities = {name: 1.0 for name in shapes} if start_dense else final
            counts = active_counts(shapes, densities)
            self.layers[net] = []
            for name, p in named:
                ones = torch.ones_like(p, dtype=torch.bool)
                self.layers[net].append(
                    Layer(net, name, index, p, final[name], counts[name], mask=ones, union=ones.clone())
                )
                index += 1
            # Owners per network, so that when only G explores its work is spread over all ranks. A layer that stays
            # dense never changes and weighs nothing.
            sizes = [layer.numel if layer.density < 1.0 else 0 for layer in self.layers[net]]
            for layer, owner in zip(self.layers[net], assign_owners(sizes, self.comm.world_size), strict=True):
                layer.owner = owner

    # ----------------------------------------------------------------------------------------------------------------
    # Start of a run.

    def initialize(self) -> None:
        """Draw the initial masks of a fresh run (not called on resume, where ``load_state_dict`` restores them)."""
        method = self.cfg.method
        if method == "prune_finetune":
            self._prune_dense_checkpoint()
        elif method in ("static", "stu"):
            for layer in self._all_layers():
                generator = torch.Generator().manual_seed(layer_seed(self.seed, 0, layer.index))
                layer.mask = random_mask(layer.param.shape, layer.count, generator).to(layer.param.device)
                layer.union = layer.mask.clone()
        for layer in self._all_layers():
            layer.ema_mask = layer.mask.clone()
        self._apply_masks()

    def _prune_dense_checkpoint(self) -> None:
        from sgtrain import checkpoint

        source = Path(self.cfg.prune_from)  # type: ignore[arg-type] (checked by SparseConfig)
        if source.is_dir():
            found = checkpoint.list_checkpoints(source)
            if not found:
                raise ConfigError(f"sparse.prune_from: no checkpoint in {source}")
            source = found[-1]
        if not source.is_file():
            raise ConfigError(f"sparse.prune_from: {source} does not exist")
        state = checkpoint.load_checkpoint(source)
        for net in NETWORKS:
            try:
                self.modules[net].load_state_dict(state[net])
            except (KeyError, RuntimeError) as error:
                raise ConfigError(f"sparse.prune_from: {source} does not hold this model's {net} ({error})") from None
            layers = self.layers[net]
            if self.cfg.prune_scope == "global":
                # One magnitude threshold over the whole network: exactly round(density * total) survive.
                _keep_global_top(layers, [layer.param.detach().abs() for layer in layers], self.target[net])
            else:
                for layer in layers:
                    layer.mask = _top_magnitude(layer.param, torch.ones_like(layer.mask), layer.count)
            for layer in layers:
                layer.union = layer.mask.clone()

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
        if self.snip_pending[net]:
            self._snip(net)
        for layer in layers:
            grad = layer.pending if self.hooked else layer.param.grad
            layer.pending = None
            if grad is not None and self._wants_gradient(layer):
                self._take_score(layer, grad)
        if self.masked_gradients and not self.hooked:
            with_grad = [layer for layer in layers if layer.param.grad is not None]
            if with_grad:
                torch._foreach_mul_([layer.param.grad for layer in with_grad], [layer.fmask for layer in with_grad])

    def _wants_gradient(self, layer: Layer) -> bool:
        """Whether this step's dense gradient of ``layer`` feeds a grow score. Only for layers an update can change:
        a dense layer's would never be read, yet would be carried (and checkpointed) for the rest of the run."""
        if not self.explores[layer.net] or layer.density >= 1.0:
            return False
        mode = self.grow[layer.net]
        return mode == "momentum" or (mode == "gradient" and self.schedule.is_update_step(self.step + 1))

    def _take_score(self, layer: Layer, grad: torch.Tensor) -> None:
        if self.grow[layer.net] == "gradient":
            # The dense gradient, read before it is masked; signed, because local gradients of several ranks must
            # be summed before the magnitude is taken.
            layer.score = grad.clone()
        else:
            if layer.score is None:
                layer.score = torch.zeros_like(layer.param)
            layer.score.mul_(GRAD_MOMENTUM).add_(grad, alpha=1 - GRAD_MOMENTUM)

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
        if self.cfg.method == "snip":
            raise ConfigError("sparse.method=snip is not supported under DeepSpeed yet (it reads whole gradients)")
        if any(self.explores[net] and self.grow[net] == "momentum" for net in NETWORKS):
            # Each rank's momentum would be its own (local scores), and a checkpoint holds rank 0's only: a resume
            # could not continue the sum over ranks exactly.
            raise ConfigError("sparse.grow_g/grow_d=momentum is not supported under DeepSpeed yet; use gradient")
        self.hooked = True
        self.local_scores = True
        self.edit_state = edit_state
        self.mask_master = mask_master
        for layer in self._all_layers():
            layer.param.register_hook(functools.partial(self._gradient_hook, layer))

    def _gradient_hook(self, layer: Layer, grad: torch.Tensor) -> torch.Tensor:
        if self._wants_gradient(layer):
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
        stu_due = self.cfg.method == "stu" and self.schedule.is_update_step(step) and any(self.explores.values())
        gmp_due = self.cfg.method == "gmp" and self._gmp_due(step)
        if not (stu_due or gmp_due):
            return {}
        entering = self._checksums()  # a mask that forked before the update must not be papered over by it
        for net in NETWORKS:
            if stu_due and self.explores[net]:
                self._drop_and_grow(net, step)
            elif gmp_due:
                self._gmp_prune(net, step)
        self._check_consistent(entering)
        metrics = {}
        for net in NETWORKS:
            metrics[f"sparse/{net}_density"] = self.density(net)
            metrics[f"sparse/{net}_itop_rate"] = self.itop_rate(net)
            if net in self.last_change:
                metrics[f"sparse/{net}_mask_change"] = self.last_change[net]
        if self.cfg.method == "stu":
            metrics["sparse/drop_fraction"] = self.schedule.drop_fraction_at(step)
        return metrics

    def _drop_and_grow(self, net: str, step: int) -> None:
        fraction = self.schedule.drop_fraction_at(step)
        update = self.schedule.update_index(step)
        mode = self.grow[net]
        # A dense layer has nothing inactive to grow; a layer that took no part in the loss has no gradient (the
        # same layers on every rank) and is left as it is.
        layers = [
            layer for layer in self.layers[net] if layer.density < 1.0 and (mode == "random" or layer.score is not None)
        ]
        scores = self._reduced_scores(layers) if mode != "random" else {}

        def select(layer: Layer) -> torch.Tensor:
            if mode == "random":
                generator = torch.Generator().manual_seed(layer_seed(self.seed, update, layer.index))
                score = random_scores(layer.param.shape, generator).to(layer.param.device)
            else:
                score = scores[layer.index].abs()  # |gradient summed over ranks| or |momentum|
            return drop_and_grow(layer.param, layer.mask, score, drop_fraction_k(layer.count, fraction))[0]

        swapped = active = 0
        for layer, new_mask in zip(layers, self._owners_compute(layers, select), strict=True):
            grown = new_mask & ~layer.mask
            changed = grown | (layer.mask & ~new_mask)
            # Dropped weights leave and grown weights enter at zero (in dense mode both are zero already, but a
            # dropped one is not). In dense mode Adam's moments are left as they are: a grown weight's are warm, as
            # in the authors' code. In masked mode the slots of both are cleared, and a grown weight's second moment
            # is seeded, so that its first steps are of the size Adam gives a warm weight.
            layer.param.masked_fill_(changed, 0.0)
            self._drop_from_ema(layer, changed)
            if self.masked_gradients:
                self._reset_state(layer, changed, grown, kept=new_mask & layer.mask)
            layer.mask = new_mask
            layer.union |= new_mask
            if mode == "gradient":
                layer.score = None
            swapped += int(grown.sum())
            active += layer.count
        self._mask_masters(net, layers)
        self.last_change[net] = swapped / max(active, 1)

    def _reset_state(
        self,
        layer: Layer,
        changed: torch.Tensor,
        grown: torch.Tensor | None = None,
        *,
        kept: torch.Tensor | None = None,
    ) -> None:
        """Masked mode: clear every optimizer slot (and an engine's master copy) of ``layer`` at ``changed``; seed
        the second moment at ``grown`` (see :func:`seed_second_moment`) unless ``grown_moments`` is "zero"."""
        if not bool(changed.any()):
            return  # the same answer on every rank (identical masks), so skipping a collective edit is safe
        seed = grown is not None and kept is not None and self.grown_moments == "seeded"

        def edit(key: str, value: torch.Tensor) -> torch.Tensor:
            value = value.masked_fill(changed.to(value.device), 0.0)
            if key == "exp_avg_sq" and seed:
                value = seed_second_moment(
                    value,
                    grown=grown.to(value.device),  # type: ignore[union-attr]
                    kept=kept.to(value.device),  # type: ignore[union-attr]
                )
            return value

        self.edit_state(layer.net, layer.param, edit)

    def _reduced_scores(self, layers: list[Layer]) -> dict[int, torch.Tensor]:
        """Grow scores by layer index, summed over ranks where they are local, on the ranks that select with them.

        Sharded: one ``reduce`` per owner of the concatenated scores of its layers, so each rank receives only what
        it selects on. Naive: one ``all_reduce`` of everything. Momentum accumulators are summed into a copy, never
        in place: they carry on after the update.
        """
        world = self.comm.world_size
        if not self.local_scores or world == 1:
            return {layer.index: layer.score for layer in layers}  # type: ignore[misc] (filtered on not None)
        groups = [[x for x in layers if x.owner == r] for r in range(world)] if self.sharded else [layers]
        summed: dict[int, torch.Tensor] = {}
        for rank, group in enumerate(groups):
            if not group:
                continue
            flat = torch.cat([layer.score.reshape(-1) for layer in group])  # type: ignore[union-attr]
            if self.sharded:
                flat = self.comm.reduce(flat, rank)
                if rank != self.comm.rank:
                    continue
            else:
                flat = self.comm.all_reduce(flat, "sum")
            for layer, part in zip(group, flat.split([layer.numel for layer in group]), strict=True):
                summed[layer.index] = part.reshape(layer.param.shape)
        return summed

    def _owners_compute(self, layers: list[Layer], select: Callable[[Layer], torch.Tensor]) -> list[torch.Tensor]:
        """New bool masks ``select(layer)`` of ``layers``, each computed by its owner and broadcast bit-packed (one
        broadcast per owner), so that every rank applies the same bits. One process or unsharded: computed here."""
        world = self.comm.world_size
        if world == 1 or not self.sharded:
            return [select(layer) for layer in layers]
        # Every owner selects all of its layers first, at the same time as the others; only then do the masks travel
        # (one broadcast per owner, in rank order). Selecting inside the broadcast loop would leave each rank waiting
        # while the owners before it select: the sum of all owners' work rather than the largest share.
        new = {layer.index: select(layer) for layer in layers if layer.owner == self.comm.rank}
        for rank in range(world):
            group = [layer for layer in layers if layer.owner == rank]
            if not group:
                continue
            sizes = [(layer.numel + 7) // 8 for layer in group]
            if rank == self.comm.rank:
                packed = torch.cat([pack_mask(new[layer.index]) for layer in group])
            else:
                packed = torch.empty(sum(sizes), dtype=torch.uint8, device=group[0].param.device)
            packed = self.comm.broadcast(packed, rank)
            if rank != self.comm.rank:
                for layer, part in zip(group, packed.split(sizes), strict=True):
                    new[layer.index] = unpack_mask(part, layer.param.shape).to(layer.param.device)
        return [new[layer.index] for layer in layers]

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

    def _gmp_due(self, step: int) -> bool:
        start = round(self.cfg.gmp_start * self.total_steps)
        end = round(self.cfg.gmp_end * self.total_steps)
        return start <= step <= end and (step % self.cfg.update_every == 0 or step == end)

    def _gmp_prune(self, net: str, step: int) -> None:
        density = gmp_density(
            step,
            initial_density=1.0,
            final_density=self.target[net],
            start_step=round(self.cfg.gmp_start * self.total_steps),
            end_step=round(self.cfg.gmp_end * self.total_steps),
        )
        layers = self.layers[net]
        shapes = {layer.name: tuple(layer.param.shape) for layer in layers}
        dense = {layer.name for layer in layers if layer.density >= 1.0}
        densities = layer_densities(shapes, density, kind=self.cfg.distribution, power=self.cfg.erk_power, dense=dense)
        counts = active_counts(shapes, densities)

        def select(layer: Layer) -> torch.Tensor:
            return _top_magnitude(layer.param, layer.mask, min(counts[layer.name], layer.count))  # pruning only removes

        removed = before = 0
        for layer, new_mask in zip(layers, self._owners_compute(layers, select), strict=True):
            pruned = layer.mask & ~new_mask
            layer.param.masked_fill_(pruned, 0.0)
            self._drop_from_ema(layer, pruned)
            if self.masked_gradients:
                self._reset_state(layer, pruned)
            removed += int(pruned.sum())
            before += layer.count
            layer.mask, layer.count = new_mask, int(new_mask.sum())
        self._mask_masters(net, layers)
        self.last_change[net] = removed / max(before, 1)

    def _snip(self, net: str) -> None:
        """SNIP (Lee et al. 2019): keep the ``density * total`` weights of largest |w * g|, one global threshold."""
        layers = self.layers[net]
        scores = [
            (layer.param * layer.param.grad).abs() if layer.param.grad is not None else torch.zeros_like(layer.param)
            for layer in layers
        ]
        _keep_global_top(layers, scores, self.target[net])
        for layer in layers:
            layer.union = layer.mask.clone()
            layer.param.mul_(layer.mask)
        self.snip_pending[net] = False

    def _checksums(self) -> torch.Tensor | None:
        """Checksums of every mask (int64), or None in one process, where there is nothing to compare."""
        if self.comm.world_size == 1:
            return None
        return torch.tensor([mask_checksum(layer.mask) for layer in self._all_layers()], dtype=torch.int64)

    def check_identical(self, when: str) -> None:
        """Stop on every rank if the ranks hold different masks (after drawing or loading them, say)."""
        checksums = self._checksums()
        if checksums is not None:
            names = [f"{layer.net}.{layer.name}" for layer in self._all_layers()]
            assert_identical(names, checksums, self.comm, when)

    def _check_consistent(self, entering: torch.Tensor | None) -> None:
        """Stop on every rank if any rank holds a different mask, entering the update or after it."""
        after = self._checksums()
        if entering is None or after is None:
            return
        names = [f"{layer.net}.{layer.name}" for layer in self._all_layers()]
        labels = [f"{name} (as it entered the update)" for name in names] + names
        assert_identical(
            labels, torch.cat([entering, after]), self.comm, f"at the topology update after step {self.step}"
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Reporting and checkpoints.

    def _all_layers(self) -> list[Layer]:
        return [layer for net in NETWORKS for layer in self.layers[net]]

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for layer in self._all_layers():
            layer.param.mul_(layer.mask)

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
        """Masks, ITOP unions and the EMA's view bit-packed (1 bit per weight); dense tensors only for momentum."""
        layers = {}
        for layer in self._all_layers():
            entry: dict[str, Any] = {
                "mask": pack_mask(layer.mask.cpu()),
                "union": pack_mask(layer.union.cpu()),
                "count": layer.count,
            }
            if layer.ema_mask is not None:
                entry["ema_mask"] = pack_mask(layer.ema_mask.cpu())
            if layer.score is not None:
                entry["score"] = layer.score.cpu()
            layers[f"{layer.net}.{layer.name}"] = entry
        return {"method": self.cfg.method, "step": self.step, "snip_pending": dict(self.snip_pending), "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", "dense") != self.cfg.method:
            raise ConfigError(
                f"the checkpoint was trained with sparse.method={state.get('method', 'dense')}, not {self.cfg.method}"
            )
        self.step = int(state["step"])
        self.snip_pending = {net: bool(state["snip_pending"][net]) for net in NETWORKS}
        saved = state["layers"]
        expected = {f"{layer.net}.{layer.name}" for layer in self._all_layers()}
        if set(saved) != expected:
            raise ConfigError("the checkpoint's masks cover other layers than this model's (sparse.targets changed?)")
        for layer in self._all_layers():
            entry = saved[f"{layer.net}.{layer.name}"]
            shape, device = layer.param.shape, layer.param.device
            layer.mask = unpack_mask(entry["mask"], shape).to(device)
            layer.union = unpack_mask(entry["union"], shape).to(device)
            layer.count = int(entry["count"])
            layer.ema_mask = unpack_mask(entry["ema_mask"], shape).to(device) if "ema_mask" in entry else None
            layer.score = entry["score"].to(device) if "score" in entry else None


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


def seed_second_moment(exp_avg_sq: torch.Tensor, *, grown: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``exp_avg_sq`` with its ``grown`` entries set to the mean of its ``kept`` entries (bool masks, all of the
    weight's shape): masked mode's second moment of a weight that just grew.

    A grown weight has had zero gradients, so its Adam second moment v is 0 while the step count t runs on; its
    first update is then ``lr * g / sqrt((1 - b2) g^2 / (1 - b2^t))``, about ``lr / sqrt(1 - b2)`` = 31.6 lr late in
    a run with b2 = 0.999, and v takes ~1/(1 - b2) steps to settle. The mean v of the layer's weights that stay
    active is a warm estimate of the layer's squared gradient, already in the bias of Adam's clock (no correction
    to apply), and needs no gradient, so it serves every growth mode and every engine alike. Measured on the
    CIFAR-10 G after a short warm-up with Adam's clock moved to step 60,000 (``python -m sgtrain bench --suite
    grown``), it gives grown weights the first-step distribution of the authors' dense mode. The alternative, the
    grown weight's own squared gradient at the update, gave steps ~0.7x too small under gradient growth: the weights
    it picks have unusually large gradients at that step, which regress at the next.
    """
    mean = exp_avg_sq[kept].mean() if bool(kept.any()) else exp_avg_sq.new_zeros(())
    return torch.where(grown, mean, exp_avg_sq)
