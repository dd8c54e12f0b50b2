"""One GAN iteration: D steps, the G step, the EMA, the masks and the topology update.

The training loop, the benchmarks, the 2-D Gaussian study and the tests all call :class:`GanStep`; there is no other
copy of this sequence. Everything it touches comes in through its inputs (networks, mask manager, EMA, losses, the
batch and latent sources, the finiteness check), so a test changes behaviour by handing in another input, never by
patching a module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from sgtrain.ema import EMA
from sgtrain.losses import HINGE, GanLoss
from sgtrain.sparse import MaskManager

# A pair of tensors: images ``[B, 3, R, R]`` (or samples ``[B, ...]``) and their classes ``[B]`` (None: unconditional).
Batch = tuple[torch.Tensor, torch.Tensor | None]


class Trainable(Protocol):
    """A network as a step drives it: :class:`LocalNetwork` here, :class:`sgtrain.dist.Network` under DDP/DeepSpeed."""

    module: nn.Module  # the network itself (its weights; called directly where no gradient may be reduced)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...  # a training forward pass

    def train(self, mode: bool = True) -> None: ...

    def zero_grad(self) -> None: ...

    def accumulating(self, *, last: bool) -> AbstractContextManager[None]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...  # every parameter group's learning rate


class LocalNetwork:
    """A module and its optimizer in one process: no wrapper, no collective."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def accumulating(self, *, last: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def always_finite(net: str, losses: list[torch.Tensor], module: nn.Module) -> bool:
    """The finiteness check of a step that trusts its numbers (benchmarks, studies): every update is applied."""
    return True


@dataclass
class StepResult:
    """What one iteration produced, for the loop's logs."""

    d_losses: list[torch.Tensor] = field(default_factory=list)  # per applied D update: [loss_real, loss_fake]
    g_loss: torch.Tensor | None = None  # None when the G update was skipped
    topology: dict[str, float] = field(default_factory=dict)  # the topology update's figures (empty: none was due)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _call(net: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return net(x) if y is None else net(x, y)


@dataclass(kw_only=True)
class GanStep:
    """One GAN iteration; :meth:`__call__` runs it.

    ``real()`` returns the next micro-batch of real data (on the step's device) and ``latents()`` the next latents
    ``(z [B, dim_z], y [B] or None)``; they are called in a fixed order (per D round: real, then latents; then the G
    rounds' latents), which is what makes a run reproducible from its seed. ``is_finite(net, losses, module)`` decides
    whether an update is applied (it may raise to roll the run back). ``probe(event)`` is called at "D", "G" (the
    network's gradients are ready, before the masks see them) and "topology" (before the topology update): tests read
    the state there.
    """

    G: Trainable
    D: Trainable
    masks: MaskManager
    ema: EMA | None = None
    losses: GanLoss = HINGE
    d_steps: int = 1
    accumulation: int = 1  # rounds per update: each round's loss is divided by this
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    is_finite: Callable[[str, list[torch.Tensor], nn.Module], bool] = always_finite
    probe: Callable[[str], None] | None = None
    # ADAPT's balance ratio: every ``balance_every`` iterations (0: never) ``on_balance(real, before, after)`` gets this
    # rank's D logits of the last real batch, of the G step's fakes and of the same latents' fakes after the G step.
    # None: the mask manager's (its method's sampling interval, 0 for all but ADAPT; its ``observe_balance``).
    balance_every: int | None = None
    on_balance: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    _last_real: Batch | None = field(default=None, init=False, repr=False)

    def __call__(
        self,
        step: int,
        real: Callable[[], Batch],
        latents: Callable[[], Batch],
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> StepResult:
        """Train iteration ``step`` (0-based): afterwards G has taken step ``step + 1``. ``augment`` transforms every
        image batch D sees (real and fake, in both steps; DiffAugment), called in a fixed order like the others."""
        result = StepResult()
        every = self.masks.balance_every if self.balance_every is None else self.balance_every
        sample = every > 0 and (step + 1) % every == 0
        augment = augment or _identity
        self.discriminator_updates(real, latents, result, augment)
        self.generator_update(latents, result, balance=sample, augment=augment)
        # Update EMA (sparse: masked with G's mask).
        if self.ema is not None:
            self.ema.update(self.G.module, step + 1)
            self.masks.after_ema(self.ema.module)
        # Topology update. Called after every G step, due or not: the manager learns the step here and decides from
        # it whether the next before_step keeps dense gradients for growth.
        if self.probe is not None:
            self.probe("topology")
        result.topology = self.masks.maybe_update(step + 1)
        return result

    def discriminator_updates(
        self,
        real: Callable[[], Batch],
        latents: Callable[[], Batch],
        result: StepResult,
        augment: Callable[[torch.Tensor], torch.Tensor] = _identity,
    ) -> None:
        G, D = self.G.module, self.D
        G.train()
        D.train()
        for _ in range(self.d_steps):
            D.zero_grad()
            losses = []
            for rnd in range(self.accumulation):
                x, y_real = real()
                z, y_fake = latents()
                with torch.no_grad(), self.autocast():
                    fake = _call(G, z, y_fake)
                # One D pass over real and fake together, as BigGAN does: half the kernel launches.
                both = None if y_real is None else torch.cat([y_real, y_fake])
                with D.accumulating(last=rnd == self.accumulation - 1):
                    with self.autocast():
                        seen = torch.cat([augment(x), augment(fake.to(x.dtype))])
                        logits = _call(D, seen, both)
                        loss_real, loss_fake = self.losses.discriminator(logits[: len(x)], logits[len(x) :])
                    D.backward((loss_real + loss_fake) / self.accumulation)  # (a DeepSpeed step: not under autocast)
                losses.append(torch.stack([loss_real.detach(), loss_fake.detach()]) / self.accumulation)
                self._last_real = (x, y_real)  # the balance ratio's E[D(x)] is D's score of the last real batch
            if not self.is_finite("D", losses, D.module):
                continue
            result.d_losses.append(torch.stack(losses).sum(0))
            self._update("D", D)

    def generator_update(
        self,
        latents: Callable[[], Batch],
        result: StepResult,
        *,
        balance: bool = False,
        augment: Callable[[torch.Tensor], torch.Tensor] = _identity,
    ) -> None:
        # D's parameters are frozen and D is called unwrapped, so this backward neither produces D gradients nor
        # makes DDP (or a DeepSpeed engine) reduce them.
        G, D = self.G, self.D.module
        D.requires_grad_(False)
        G.zero_grad()
        losses = []
        for rnd in range(self.accumulation):
            z, y = latents()
            with G.accumulating(last=rnd == self.accumulation - 1):
                with self.autocast():
                    logits = _call(D, augment(_call(G, z, y)), y)
                    loss = self.losses.generator(logits)
                G.backward(loss / self.accumulation)
            losses.append(loss.detach() / self.accumulation)
        D.requires_grad_(True)
        if self.is_finite("G", losses, G.module):
            result.g_loss = torch.stack(losses).sum()
            self._update("G", G)
        # Only after an applied G update: a skipped one (a non-finite loss) would hand over "after" = "before".
        if balance and result.g_loss is not None and self._last_real is not None:
            # One extra D pass (unwrapped: nothing to reduce) over the last real batch and the last round's latents
            # through the updated G, both networks in training mode as in the G step: D is the one that scored the
            # fakes before the step, so "before" and "after" differ by the G update only (as YiteWang/ADAPT does; as
            # there, training mode means this pass also moves G's batch-norm statistics and D's spectral-norm vectors).
            x, y_real = self._last_real
            with torch.no_grad(), self.autocast():
                fake = _call(G.module, z, y)
                both = None if y_real is None else torch.cat([y_real, y])
                scores = _call(D, torch.cat([augment(x), augment(fake.to(x.dtype))]), both)
            observe = self.masks.observe_balance if self.on_balance is None else self.on_balance
            observe(scores[: len(x)], logits.detach(), scores[len(x) :])

    def _update(self, net: str, network: Trainable) -> None:
        if self.probe is not None:
            self.probe(net)
        self.masks.before_step(net)
        network.optimizer_step()
        self.masks.after_step(net)
