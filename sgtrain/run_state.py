"""What a checkpoint holds, registered once: saving and resuming both walk :class:`CheckpointIO`'s registration.

A checkpoint is one dict (``sgtrain.checkpoint`` writes it atomically, loads it with ``weights_only=True``)::

    step, flops                    the run's progress (:class:`Progress`; top level, where tools read them)
    position, data                 the batch source: images drawn so far; every rank's shard-stream position
    config                         the resolved config; a resume refuses other values of FIXED_ON_RESUME
    G, D, ema                      the networks' and the EMA generator's state dicts
    masks                          the mask manager (bit-packed masks, unions, EMA masks, method state)
    opt_g, opt_d                   Adam's state, laid out as torch's Adam (unpartitioned under DeepSpeed)
    rng                            torch's CPU and CUDA generator states
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sgtrain.config import Config, ConfigError, config_from_dict, config_to_dict


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Progress:
    """How far the run is: G steps taken and training FLOPs (this run's, and its dense counterpart's)."""

    step: int = 0
    flops: dict[str, float] = field(default_factory=lambda: {"sparse": 0.0, "dense": 0.0})

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "flops": dict(self.flops)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.flops = {key: float(value) for key, value in state["flops"].items()}


class RngState:
    """torch's global generators (CPU, and CUDA where the same number of devices is visible)."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class OptimizerState:
    """A network's optimizer, through whatever carries it (``optimizer_state`` gathers DeepSpeed's partitions)."""

    def __init__(self, network: Any) -> None:
        self.network = network

    def state_dict(self) -> dict[str, Any]:
        return self.network.optimizer_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_optimizer_state(state)


# Settings a run cannot change when it resumes: they define the weights and masks in the checkpoint.
FIXED_ON_RESUME = {
    "model": None,  # every key
    "sparse": (
        "method",
        "distribution",
        "erk_power",
        "density_g",
        "density_d",
        "targets",
        "dense_first_last",
        "optimizer_state",  # masked mode keeps inactive moments at zero; a dense-mode checkpoint holds warm ones
    ),
}

# Settings added after checkpoints existed, with the behaviour those older checkpoints were trained with: a saved
# config holds every field of its time, so a missing one means "before it existed", not today's default.
LEGACY_SETTINGS = {
    "sparse": {"optimizer_state": "masked", "drop_fraction_min": 0.0},
    "train": {"ema_buffers": "copy"},
}


@dataclass
class ConfigGuard:
    """Saves the resolved config; on resume, refuses a checkpoint trained with other fixed settings."""

    cfg: Config
    source: Path | None = None  # the checkpoint being resumed, for the message

    def state_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        saved = {key: dict(value) if isinstance(value, dict) else value for key, value in saved.items()}
        for section, values in LEGACY_SETTINGS.items():
            for key, value in values.items():
                saved.setdefault(section, {}).setdefault(key, value)
        old = config_from_dict(saved)
        diff = []
        for section, keys in FIXED_ON_RESUME.items():
            before, now = getattr(old, section), getattr(self.cfg, section)
            for key in keys or vars(now):
                if getattr(before, key) != getattr(now, key):
                    diff.append(
                        f"{section}.{key}: {getattr(before, key)!r} in the checkpoint, {getattr(now, key)!r} now"
                    )
        if diff:
            raise ConfigError(f"{self.source} was trained with other settings ({'; '.join(diff)}); use a new run_dir")


class CheckpointIO:
    """The pieces of a run's state, by checkpoint key, in the order a resume restores them.

    ``flat`` pieces write their keys at the top level of the checkpoint (the progress, the batch source) and are
    handed the whole checkpoint to resume from. ``state_dict()`` may be a collective (DeepSpeed's optimizer
    partitions, every rank's stream position): every rank calls it, and every rank resumes every piece.
    """

    def __init__(self, *flat: Stateful, **pieces: Stateful) -> None:
        self.flat, self.pieces = flat, pieces

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for piece in self.flat:
            state.update(piece.state_dict())
        for name, piece in self.pieces.items():
            state[name] = piece.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, piece in self.pieces.items():
            if name == "config":  # first: a changed setting is named, not met as a shape error further on
                piece.load_state_dict(state[name])
        for piece in self.flat:
            piece.load_state_dict(state)
        for name, piece in self.pieces.items():
            if name != "config":
                piece.load_state_dict(state[name])
