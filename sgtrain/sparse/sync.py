"""What makes the mask manager distributed: who owns which layer, how scores and masks travel, how ranks agree.

Every rank must apply the identical topology update: one differing bit forks the replicas silently. The manager
never talks to torch.distributed itself; it is handed a :class:`Comm` (``sgtrain.dist.Dist`` in a run,
:class:`LocalComm` in one process) and uses only the collectives below.

- Ownership: each updatable layer has one owner rank, chosen deterministically and balanced by size
  (:func:`assign_owners`), so the selection work and its memory fall with the number of ranks.
- Scores that are local to a rank (not already averaged by DDP) are summed onto the layer's owner with one
  ``reduce`` per owner; the owner selects; the new masks travel bit-packed in one ``broadcast`` per owner.
- After every update all ranks compare a checksum of every mask (:func:`assert_identical`) and stop on any
  difference, naming the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class MaskDivergenceError(RuntimeError):
    """Ranks hold different masks: the replicas would fork silently, so the run stops."""


class Comm(Protocol):
    """The collectives the mask manager needs. Every call is made by every rank, in the same order."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced with ``op`` in {"sum", "min", "max"}; every rank gets the result."""
        ...

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """The sum of ``tensor`` over ranks, valid on rank ``dst`` only."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank (same shape and dtype everywhere)."""
        ...


class LocalComm:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor


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
