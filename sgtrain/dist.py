"""Everything that touches Accelerate or torch.distributed lives here.

Models, losses and the sparse code never import torch.distributed: they are handed the functions of
:class:`Dist` (reduce, broadcast, barrier) by the training loop.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch
from torch import nn


class LaunchError(RuntimeError):
    """The processes were launched in a way that would silently train the wrong thing."""


class Dist:
    """The process group of a run, as seen from one rank."""

    def __init__(self) -> None:
        from accelerate import Accelerator  # imported lazily: ~2 s, and `print-config` does not need it

        # `accelerate launch --multi_gpu` on a CPU machine starts processes that each believe they are alone unless
        # the accelerator is told to use the CPU (ENVIRONMENT.md): ask for it whenever there is no GPU.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise LaunchError(
                f"the launcher started {launched} processes but the process group has {self.world_size}: every "
                "process would train alone. On a CPU machine launch with ACCELERATE_USE_CPU=1 (see README)."
            )

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

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over ranks with ``op`` in {"sum", "min", "max"} (every rank gets the result)."""
        if self.world_size == 1:
            return tensor
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
        ops["max"] = torch.distributed.ReduceOp.MAX
        moved = tensor.to(self.device)
        torch.distributed.all_reduce(moved, op=ops[op])
        return moved.to(tensor.device)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def shutdown(self) -> None:
        """Leave the process group cleanly; gloo aborts at exit in a fraction of runs otherwise."""
        gc.collect()
        self.barrier()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
