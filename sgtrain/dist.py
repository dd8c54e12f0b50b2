"""Everything that touches Accelerate or torch.distributed lives here.

Models, losses and the sparse code never import torch.distributed: they are handed the functions of
:class:`Dist` (reduce, broadcast, barrier) by the training loop.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}  # names in torch.distributed.ReduceOp


class _SumOverRanks(torch.autograd.Function):
    """``S = sum_r x_r`` on every rank. Every rank's loss depends on S, so the gradient of x_r is the sum over ranks
    of dL_r/dS: the backward is an all-reduce too (DDP then averages parameter gradients as usual)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


class LaunchError(RuntimeError):
    """The processes were launched in a way that would silently train the wrong thing."""


def check_world_size(environ: Mapping[str, str], group_size: int) -> None:
    """Stop if the launcher started more processes (``WORLD_SIZE``) than joined the process group: each would train
    alone on the full config, silently (the trap of `accelerate launch --multi_gpu` on a CPU machine)."""
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched != group_size:
        raise LaunchError(
            f"the launcher started {launched} processes but the process group has {group_size}: every process "
            "would train alone. On a CPU machine use launchers/cpu_2proc.yaml or set ACCELERATE_USE_CPU=1 (README)."
        )


class Dist:
    """The process group of a run, as seen from one rank."""

    def __init__(self) -> None:
        from accelerate import Accelerator  # imported lazily: ~2 s, and `print-config` does not need it

        # `accelerate launch --multi_gpu` on a CPU machine starts processes that each believe they are alone unless
        # the accelerator is told to use the CPU (ENVIRONMENT.md): ask for it whenever there is no GPU.
        try:
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        except ValueError as error:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR: Accelerate's own words
            raise LaunchError(f"cannot join the process group: {error}") from None
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        check_world_size(os.environ, self.world_size)

    @property
    def backend(self) -> str:
        """The process group's backend ("gloo", "nccl"), or "none" in a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return str(torch.distributed.get_backend())
        return "none"

    def describe(self) -> str:
        return f"{self.world_size} process{'es' if self.world_size > 1 else ''} ({self.backend}, {self.device.type})"

    def prepare(self, module: nn.Module) -> nn.Module:
        """Wrap ``module`` for data-parallel training (DDP when there are several processes)."""
        return self.accelerator.prepare_model(module)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, skip: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce for this backward (all but the last accumulation round)."""
        if skip and self.world_size > 1:
            with self.accelerator.no_sync(module):
                yield
        else:
            yield

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average of ``tensor`` over ranks (every rank gets it)."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="mean")

    # The collectives below implement sgtrain.sparse.sync.Comm. Tensors travel on the process group's device (gloo:
    # CPU, NCCL: the rank's GPU) and come back on the device they came from.

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over ranks with ``op`` in {"sum", "min", "max"} (every rank gets the result)."""
        if self.world_size == 1:
            return tensor
        moved = tensor.to(self.device)
        torch.distributed.all_reduce(moved, op=getattr(torch.distributed.ReduceOp, _OPS[op]))
        return moved.to(tensor.device)

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """The sum of ``tensor`` over ranks; valid on rank ``dst`` only."""
        if self.world_size == 1:
            return tensor
        moved = tensor.to(self.device)
        torch.distributed.reduce(moved, dst=dst, op=torch.distributed.ReduceOp.SUM)
        return moved.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank."""
        if self.world_size == 1:
            return tensor
        moved = tensor.to(self.device)
        torch.distributed.broadcast(moved, src=src)
        return moved.to(tensor.device)

    def sum_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks that autograd differentiates through (cross-replica batch norm statistics)."""
        return tensor if self.world_size == 1 else _SumOverRanks.apply(tensor)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def shutdown(self) -> None:
        """Leave the process group cleanly; gloo aborts at exit in a fraction of runs otherwise."""
        gc.collect()
        self.barrier()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
