"""Everything that touches Accelerate, DeepSpeed or torch.distributed lives here.

Models, losses and the sparse code never import torch.distributed: they are handed the functions of
:class:`Dist` (reduce, broadcast, barrier) by the training loop, and the loop trains each network through a
:class:`Network` (DDP through Accelerate, or a DeepSpeed ZeRO-1/2 engine when the launcher asks for DeepSpeed).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgtrain.config import ConfigError

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

    def __init__(self, timeout_s: float = 1800.0) -> None:
        """Join the launcher's process group. ``timeout_s``: how long a collective waits for a dead or hung peer
        before it raises on this rank (so that the survivors of a crash exit instead of hanging)."""
        self.deepspeed_config = deepspeed_config_from_env(os.environ)
        self.accelerator: Any = None
        self.timeout = timedelta(seconds=timeout_s)
        if self.deepspeed_config is not None:
            self._join_for_deepspeed()
            check_world_size(os.environ, self.world_size)
            return
        from accelerate import Accelerator  # imported lazily: ~2 s, and `print-config` does not need it
        from accelerate.utils import InitProcessGroupKwargs

        # `accelerate launch --multi_gpu` on a CPU machine starts processes that each believe they are alone unless
        # the accelerator is told to use the CPU (ENVIRONMENT.md): ask for it whenever there is no GPU.
        try:
            self.accelerator = Accelerator(
                cpu=not torch.cuda.is_available(),
                mixed_precision="no",
                kwargs_handlers=[InitProcessGroupKwargs(timeout=self.timeout)],
            )
        except ValueError as error:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR: Accelerate's own words
            raise LaunchError(f"cannot join the process group: {error}") from None
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        check_world_size(os.environ, self.world_size)

    def _join_for_deepspeed(self) -> None:
        """The process group for DeepSpeed engines, without an ``Accelerator``: under a DeepSpeed launch Accelerate
        would build its own DeepSpeed plugin, which needs the ``transformers`` package (ENVIRONMENT.md)."""
        try:
            import deepspeed
        except ImportError:
            raise LaunchError(
                "the launcher asks for DeepSpeed, which is not installed: pip install -e '.[deepspeed]'"
            ) from None
        # DeepSpeed JIT-compiles a shared-memory collective at its first init (~60 s) unless told not to; gloo and
        # NCCL do not need it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        cuda = torch.cuda.is_available()
        if not torch.distributed.is_initialized():
            try:
                torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=self.timeout)
            except ValueError as error:
                raise LaunchError(f"cannot join the process group: {error}") from None
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=self.timeout)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0

    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed_config is not None

    @property
    def backend(self) -> str:
        """The process group's backend ("gloo", "nccl"), or "none" in a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return str(torch.distributed.get_backend())
        return "none"

    def describe(self) -> str:
        engine = f", DeepSpeed ZeRO-{_zero_stage(self.deepspeed_config)}" if self.deepspeed_config is not None else ""
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return f"{processes} ({self.backend}, {self.device.type}{engine})"

    def prepare(self, module: nn.Module) -> nn.Module:
        """Wrap ``module`` for data-parallel training (DDP when there are several processes)."""
        return self.accelerator.prepare_model(module)

    def wrap(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch: int, accumulation: int
    ) -> Network:
        """``module`` and its optimizer as the loop trains them: DDP, or a DeepSpeed engine under a DeepSpeed launch.

        Under DeepSpeed, masks and the loaded weights must already be in ``module``: the engine copies the weights into
        its fp32 master partitions here.
        """
        if self.deepspeed_config is None:
            return Network(self, module, optimizer, self.prepare(module))
        import deepspeed

        config = dict(self.deepspeed_config)
        # The batch is sgtrain's (train.batch_size, train.accumulation): DeepSpeed is told, never asked.
        config.update(
            train_micro_batch_size_per_gpu=micro_batch,
            gradient_accumulation_steps=accumulation,
            train_batch_size=micro_batch * accumulation * self.world_size,
        )
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        return Network(self, module, optimizer, engine, engine=engine)

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, skip: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce for this backward (all but the last accumulation round)."""
        if skip and self.world_size > 1 and self.accelerator is not None:
            with self.accelerator.no_sync(module):
                yield
        else:
            yield

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average of ``tensor`` over ranks (every rank gets it)."""
        if self.world_size == 1:
            return tensor
        return self.all_reduce(tensor, "sum") / self.world_size

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
        if self.world_size > 1:
            torch.distributed.barrier()

    def shutdown(self, clean: bool = True) -> None:
        """Leave the process group: after a barrier when every rank finished (gloo aborts at exit in a fraction of
        runs otherwise), without one when this rank is failing (the others may never reach it)."""
        gc.collect()
        if clean:
            self.barrier()
        if self.accelerator is not None and clean:
            self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Network:
    """One network as the training loop drives it, whatever carries it (plain, DDP, or a DeepSpeed engine).

    Per optimizer step::

        net.zero_grad()
        for each accumulation round:
            with net.accumulating(last=...):
                loss = f(net(...)); net.backward(loss / rounds)
        masks.before_step(...); net.optimizer_step(); masks.after_step(...)

    DDP all-reduces gradients in the last round only. A DeepSpeed engine reduces (and, under ZeRO-2, partitions)
    gradients itself during backward and takes the optimizer step inside its last ``step()`` call, which is why
    the mask manager reads (and, in masked mode, masks) gradients in autograd hooks under DeepSpeed
    (``MaskManager.attach_to_engine``).
    """

    def __init__(
        self, dist: Dist, module: nn.Module, optimizer: torch.optim.Optimizer, wrapped: nn.Module, engine: Any = None
    ) -> None:
        self.dist = dist
        self.module = module  # the network itself: its state dict, its unwrapped forward
        self.optimizer = optimizer
        self.wrapped = wrapped  # what a training forward pass calls: DDP, a DeepSpeed engine, or the module
        self.engine = engine

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """A training forward pass (through DDP or the engine, so that its backward is reduced)."""
        return self.wrapped(*inputs)

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    def zero_grad(self) -> None:
        if self.engine is None:  # a DeepSpeed engine clears its gradients after each step by itself
            self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def accumulating(self, *, last: bool) -> Iterator[None]:
        """Around one accumulation round's forward and backward: no DDP all-reduce unless it is the last."""
        with self.dist.no_sync(self.wrapped, skip=not last):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is already divided by the number of accumulation rounds (so DeepSpeed must not divide again)."""
        if self.engine is None:
            loss.backward()
        else:
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()  # every round: the engine counts rounds and steps the optimizer at the last one

    def set_lr(self, lr: float) -> None:
        """Set every parameter group's learning rate (a DeepSpeed engine's ZeRO optimizer holds its own groups)."""
        groups = self.engine.optimizer.param_groups if self.engine is not None else self.optimizer.param_groups
        for group in groups:
            group["lr"] = lr

    def optimizer_step(self) -> None:
        if self.engine is None:
            self.optimizer.step()

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state as ``torch.optim.Adam.state_dict()`` lays it out, unpartitioned, so a checkpoint
        does not depend on the engine or the number of ranks. Under DeepSpeed a collective: every rank calls it."""
        if self.engine is None:
            return self.optimizer.state_dict()
        from deepspeed.utils import safe_get_full_optimizer_state

        params = list(self.module.parameters())
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        # An Adam over stand-ins of the weights, holding the engine's gathered moments: its state_dict() is then the
        # exact layout a plain run writes (the weights themselves travel in the module's state dict).
        plain = torch.optim.Adam([nn.Parameter(torch.empty(0)) for _ in params], **_adam_args(group))
        step = _engine_adam_step(self.engine)
        for mirror, p in zip(plain.param_groups[0]["params"], params, strict=True):
            plain.state[mirror] = {
                "step": torch.tensor(step),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
            }
        return plain.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state`'s output (from this or any other engine). Under DeepSpeed a collective."""
        if self.engine is None:
            self.optimizer.load_state_dict(state)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = list(self.module.parameters())
        _create_engine_adam_state(self.engine, step=float(next(iter(state["state"].values()))["step"]))
        with torch.no_grad():
            for index, p in enumerate(params):
                slot = state["state"][index]
                safe_set_full_fp32_param(p, p.detach().float())  # the module already holds the loaded weights
                safe_set_full_optimizer_state(p, slot["exp_avg"].to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, slot["exp_avg_sq"].to(p.device), "exp_avg_sq")

    def edit_state(self, param: nn.Parameter, edit: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        """Apply ``edit(key, whole tensor) -> new tensor`` to the engine's fp32 master copy of ``param`` (key
        "param": ZeRO-1/2 keep one even for fp32 weights, and copy it back into the weight at the next step) and to
        its Adam moments ("exp_avg", "exp_avg_sq"), each gathered whole and scattered back into the partitions. A
        collective: every rank calls it for the same weights in the same order."""
        if self.engine is None:
            raise RuntimeError("edit_state is for DeepSpeed engines; the mask manager edits torch optimizers itself")
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        with torch.no_grad():
            safe_set_full_fp32_param(param, edit("param", safe_get_full_fp32_param(param)))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, edit(key, safe_get_full_optimizer_state(param, key)), key)

    def mask_master(self, params: list[nn.Parameter], masks: list[torch.Tensor]) -> None:
        """Multiply the engine's fp32 master copy of each param by its mask (float, the param's shape), on the part
        this rank holds: no communication. ZeRO-1/2 map each weight onto a contiguous range of the flat partition
        (DeepSpeed's ``_hp_mapping``: the weight's flat range here and the matching view of the master copy)."""
        with torch.no_grad():
            for param, mask in zip(params, masks, strict=True):
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is None:
                    continue  # none of this weight lies in this rank's partition
                where = mapping.lp_fragment_address
                mapping.hp_fragment.mul_(mask.reshape(-1).narrow(0, where.start, where.numel).to(mapping.hp_fragment))


def deepspeed_config_from_env(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The DeepSpeed config of a DeepSpeed launch (``accelerate launch --config_file launchers/deepspeed_zero2.yaml``
    sets ``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_CONFIG_FILE``), checked; None otherwise."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        raise ConfigError("a DeepSpeed launch needs deepspeed_config_file in its Accelerate config (see launchers/)")
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"DeepSpeed config {path}: {error}") from None
    stage = _zero_stage(config)
    if stage == 3:
        raise ConfigError(
            f"DeepSpeed config {path}: ZeRO stage 3 shards the weights themselves; sgtrain's masks need whole "
            "tensors, so stages 1 and 2 are supported (README, Distributed training)"
        )
    if stage not in (1, 2):
        raise ConfigError(
            f"DeepSpeed config {path}: ZeRO stage {stage}: stages 1 and 2 are supported (without ZeRO, launch with "
            "DDP: launchers/cpu_2proc.yaml, gpu_8.yaml)"
        )
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled") in (True, "true", "auto"):
            raise ConfigError(
                f"DeepSpeed config {path}: {key} is enabled; use sgtrain's train.mixed_precision: bf16 (autocast with "
                "fp32 weights, losses and SN power iteration) instead"
            )
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(
                f"DeepSpeed config {path}: remove the {key!r} block; sgtrain passes its own Adam (a DeepSpeed "
                "optimizer block also compiles FusedAdam at start-up)"
            )
    return config


def _zero_stage(config: Mapping[str, Any] | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def _adam_args(group: Mapping[str, Any]) -> dict[str, Any]:
    return {key: group[key] for key in ("lr", "betas", "eps", "weight_decay", "amsgrad") if key in group}


def _engine_adam_step(engine: Any) -> float:
    """Adam's step count inside a DeepSpeed engine (one per flat partition, all equal); 0 before the first step."""
    steps = {float(slot["step"]) for slot in engine.optimizer.optimizer.state.values() if "step" in slot}
    if len(steps) > 1:
        raise RuntimeError(f"DeepSpeed's Adam partitions disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _create_engine_adam_state(engine: Any, step: float) -> None:
    """A fresh engine's Adam has no state until its first step, and DeepSpeed links its per-weight views of that
    state only then: create zero state at ``step`` on the flat partitions and link it, so it can be written."""
    zero_optimizer, base = engine.optimizer, engine.optimizer.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            base.state[flat] = {
                "step": torch.tensor(step),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    # DeepSpeed 0.19 has no public way to do this; this private method is what its own first step calls.
    zero_optimizer._lazy_init_hp_params_optimizer_state()
