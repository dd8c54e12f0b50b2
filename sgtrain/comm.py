"""The one distributed seam: the collectives that code below the launcher is handed (never ``torch.distributed``).

:class:`sgtrain.dist.Dist` implements :class:`Comm` over gloo/NCCL; :class:`LocalComm` is one process. The mask
manager, the data sources, evaluation and the stop request take a ``Comm``; every call is made by every rank, in the
same order.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Comm(Protocol):
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

    def barrier(self) -> None:
        """Wait until every rank is here."""
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

    def barrier(self) -> None:
        pass
