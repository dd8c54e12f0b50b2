"""What makes the mask manager distributed: who owns which layer, how scores and masks travel, how ranks agree.

Every rank must apply the identical topology update: one differing bit forks the replicas silently. The manager
never talks to torch.distributed itself; it is handed a :class:`Comm` (``sgtrain.dist.Dist`` in a run,
:class:`LocalComm` in one process) and uses only the collectives below, through :class:`Sharding`, the one object
that knows about ranks: sparse methods hand it their layers and a selection function and get back every rank's
identical new masks.

- Ownership: each updatable layer has one owner rank, chosen deterministically and balanced by size
  (:func:`assign_owners`), so the selection work and its memory fall with the number of ranks.
- Scores that are local to a rank (not already averaged by DDP) are summed onto the layer's owner with one
  ``reduce`` per owner; the owner selects; the new masks travel bit-packed in one ``broadcast`` per owner.
- A selection over a whole network (one threshold over all its layers, as ADAPT's global drop and growth) is found
  without moving any score: the owners count their candidates above trial thresholds and only the counts are
  all-reduced (:meth:`Sharding.top_over_layers`); each owner then selects its layers and broadcasts them as above.
- After every update all ranks compare a checksum of every mask (:func:`assert_identical`) and stop on any
  difference, naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from sgtrain.comm import Comm
from sgtrain.sparse.topology import mask_checksum, pack_mask, unpack_mask

if TYPE_CHECKING:
    from sgtrain.sparse.layers import Layer


class MaskDivergenceError(RuntimeError):
    """Ranks hold different masks: the replicas would fork silently, so the run stops."""


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each of ``len(sizes)`` layers: largest layer first onto the least-loaded rank.

    Greedy longest-processing-time scheduling: the busiest rank ends within the largest layer of the ideal
    ``sum(sizes) / world_size``. Ties go to the lower layer index and the lower rank, so every process computes the
    same assignment from the same sizes with no communication.
    """
    load = [0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += sizes[index]
    return owners


def assert_identical(names: Sequence[str], checksums: torch.Tensor, comm: Comm, when: str) -> None:
    """Stop with :class:`MaskDivergenceError` if any rank's ``checksums`` (int64 ``[len(names)]``) differ.

    The minimum and the maximum over ranks are equal only if every rank holds the same value; every rank takes part
    in both reductions and so every rank raises, and none is left waiting in a later collective.
    """
    if comm.world_size == 1:
        return
    low = comm.all_reduce(checksums.clone(), "min")
    high = comm.all_reduce(checksums.clone(), "max")
    differ = [name for name, lo, hi in zip(names, low.tolist(), high.tolist(), strict=True) if lo != hi]
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise MaskDivergenceError(
            f"ranks hold different masks for {differ[0]}{more} {when}: the replicas have forked; stopping"
        )


class Sharding:
    """The owner / reduce / broadcast protocol of topology updates over ``comm`` (docs/design.md, "The sparse
    core"), for the :class:`~sgtrain.sparse.layers.Layer` lists of a manager.

    ``local_scores``: the scores a rank holds are its own, not averaged over ranks (no DDP, ZeRO-partitioned or
    hook-captured gradients), so they are summed across ranks before selection. ``sharded=False`` is the naive scheme
    kept for the benchmark: every rank selects every layer itself (after an all-reduce of local scores).
    """

    def __init__(self, comm: Comm, *, local_scores: bool = False, sharded: bool = True) -> None:
        self.comm = comm
        self.local_scores = local_scores
        self.sharded = sharded

    def assign_owners(self, layers: Sequence[Layer], *, every_layer: bool = False) -> None:
        """Set ``layer.owner`` of one network's layers (:func:`assign_owners`). Per network, so that when only G
        explores its work is spread over all ranks; a layer that stays dense never changes and weighs nothing,
        unless ``every_layer`` (a method that selects over the whole network changes dense layers too)."""
        sizes = [layer.numel if layer.density < 1.0 or every_layer else 0 for layer in layers]
        for layer, owner in zip(layers, assign_owners(sizes, self.comm.world_size), strict=True):
            layer.owner = owner

    def reduce_scores(self, layers: Sequence[Layer]) -> dict[int, torch.Tensor]:
        """``layer.score`` by layer index (weight-shaped), summed over ranks where they are local, on the ranks that
        select with them.

        Sharded: one ``reduce`` per owner of the concatenated scores of its layers, so each rank receives only what
        it selects on. Naive: one ``all_reduce`` of everything. Momentum accumulators are summed into a copy, never
        in place: they carry on after the update.
        """
        world = self.comm.world_size
        if not self.local_scores or world == 1:
            return {layer.index: layer.score for layer in layers}  # type: ignore[misc] (filtered on not None)
        groups = [[x for x in layers if x.owner == r] for r in range(world)] if self.sharded else [list(layers)]
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

    def select(self, layers: Sequence[Layer], select: Callable[[Layer], torch.Tensor]) -> list[torch.Tensor]:
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

    def top_over_layers(
        self, layers: Sequence[Layer], candidates: Callable[[Layer], tuple[torch.Tensor, torch.Tensor]], k: int
    ) -> dict[int, torch.Tensor]:
        """The ``k`` largest values over all of ``layers`` at once: one threshold for the whole set, ties to the lower
        layer (in list order), then to the lower flat index, so the result is :func:`select_top` over the layers'
        concatenation. A collective: every rank calls it with the same layers and ``k``.

        ``candidates(layer)`` returns ``(allowed, values)``: a bool and a non-negative float tensor of the weight's
        shape (NaN counts as 0); it is called for the layers this rank selects (its own when sharded, else all) and
        the result, a flat bool tensor of the chosen positions by layer index, covers those layers only.

        No value leaves its rank. The k-th largest value is found on the order-preserving integer image of
        non-negative floats (their IEEE bits) by a 256-way search: each round every rank counts its candidates at or
        above 255 trial thresholds and one all-reduce sums the counts, so four or five rounds pin it down exactly
        whatever the number of weights. One more all-reduce of per-layer counts of values equal to it tells each
        owner how many of its ties to take.
        """
        distributed = self.comm.world_size > 1 and self.sharded
        mine = [layer for layer in layers if layer.owner == self.comm.rank] if distributed else list(layers)

        def total(values: torch.Tensor) -> torch.Tensor:
            return self.comm.all_reduce(values, "sum") if distributed else values

        keys: dict[int, torch.Tensor] = {}
        allowed: dict[int, torch.Tensor] = {}
        for layer in mine:
            ok, values = candidates(layer)
            values = values.detach().reshape(-1).float()
            values = torch.where(values > 0, values, torch.zeros_like(values))  # -0.0 and NaN to +0.0
            allowed[layer.index] = ok.reshape(-1)
            keys[layer.index] = values.view(torch.int32)  # non-negative floats sort as their bits do
        device = layers[0].param.device if layers else torch.device("cpu")
        pool = [keys[i][allowed[i]] for i in keys]
        ordered = torch.sort(torch.cat(pool) if pool else torch.zeros(0, dtype=torch.int32, device=device)).values
        n = int(total(torch.tensor([ordered.numel()], dtype=torch.int64))[0])
        k = max(0, min(k, n))
        if k in (0, n):
            return {i: allowed[i].clone() if k else torch.zeros_like(allowed[i]) for i in keys}
        # Invariant: at least k candidates are >= low, fewer than k are >= high.
        low, high = 0, int(torch.iinfo(torch.int32).max) + 1
        while high - low > 1:
            trials = torch.unique(torch.linspace(low, high, 257, dtype=torch.float64).round().long()[1:-1])
            trials = trials[(trials > low) & (trials < high)]
            below = torch.searchsorted(ordered, trials.to(device=ordered.device, dtype=torch.int32), side="left")
            at_least = total(ordered.numel() - below.cpu().to(torch.int64))
            enough = (at_least >= k).nonzero().squeeze(1)
            if enough.numel():
                low = int(trials[enough[-1]])
            after = enough[-1] + 1 if enough.numel() else 0
            high = int(trials[after]) if after < trials.numel() else high
        # ``low`` is now the k-th largest value: fewer than k lie above it; the rest are taken from its ties in order.
        counts = torch.zeros(2, len(layers), dtype=torch.int64)
        position = {layer.index: j for j, layer in enumerate(layers)}
        for i in keys:
            counts[0, position[i]] = int((allowed[i] & (keys[i] > low)).sum())
            counts[1, position[i]] = int((allowed[i] & (keys[i] == low)).sum())
        counts = total(counts)
        before = torch.cumsum(counts[1], 0) - counts[1]  # ties in the layers listed before each one
        left = k - int(counts[0].sum())
        chosen = {}
        for i in keys:
            quota = max(0, min(int(counts[1, position[i]]), left - int(before[position[i]])))
            pick = allowed[i] & (keys[i] > low)
            ties = (allowed[i] & (keys[i] == low)).nonzero().squeeze(1)[:quota]
            pick[ties] = True
            chosen[i] = pick
        return chosen

    def checksums(self, layers: Sequence[Layer]) -> torch.Tensor | None:
        """Checksums of every mask (int64 ``[len(layers)]``), or None in one process, where there is nothing to
        compare."""
        if self.comm.world_size == 1:
            return None
        return torch.tensor([mask_checksum(layer.mask) for layer in layers], dtype=torch.int64)

    def check_identical(self, layers: Sequence[Layer], when: str) -> None:
        """Stop on every rank if the ranks hold different masks (after drawing or loading them, say)."""
        checksums = self.checksums(layers)
        if checksums is not None:
            assert_identical([f"{layer.net}.{layer.name}" for layer in layers], checksums, self.comm, when)

    def check_consistent(self, layers: Sequence[Layer], entering: torch.Tensor | None, when: str) -> None:
        """Stop on every rank if any rank holds a different mask, ``entering`` (:meth:`checksums` taken before) the
        update or after it: a mask that forked before the update must not be papered over by it."""
        after = self.checksums(layers)
        if entering is None or after is None:
            return
        names = [f"{layer.net}.{layer.name}" for layer in layers]
        labels = [f"{name} (as it entered the update)" for name in names] + names
        assert_identical(labels, torch.cat([entering, after]), self.comm, when)
