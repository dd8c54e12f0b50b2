"""Where a run's real batches come from: one interface over the bundled data in memory and webdataset shards.

A :class:`BatchSource` hands out this rank's share of each global micro-batch (``next(device)``), counts the images
of the global batches it served (``position``, what the logs call ``images_seen``) and says what a checkpoint must
keep to resume it exactly (``state_dict()``: top-level checkpoint keys, ``position`` and, for shards, ``data``).
:func:`check_data` validates the data against the model before any work starts; :func:`open_batches` opens the
source.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sgtrain.comm import Comm
from sgtrain.config import Config, ConfigError
from sgtrain.data.builtin import BUILTIN_DATASETS, ImageSet, IndexStream, load_builtin
from sgtrain.data.shards import bundled_shards
from sgtrain.data.stream import ShardLoader, ShardSet, resolve_shards

DATA_FIELDS = ("next", "good", "bad")  # a rank's stream state besides its per-worker offsets


class BatchSource(Protocol):
    position: int  # images of the global batches served so far, all ranks together
    bad: int | None  # corrupt samples this rank skipped (None: a source without any)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's images ``[micro, 3, R, R]`` in [-1, 1] and classes ``[micro]`` of the next global batch."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What resumes the source: ``position`` and whatever else it needs. A collective: every rank calls it."""
        ...

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Resume from a checkpoint's top level (before the first ``next``)."""
        ...


@dataclass
class MemoryBatches:
    """A bundled dataset in memory: batch ``k`` is a pure function of ``(seed, position)`` (:class:`IndexStream`)."""

    data: ImageSet
    stream: IndexStream
    global_batch: int  # images per global micro-batch
    position: int = 0
    bad: int | None = None

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.stream.indices(self.position, self.global_batch)
        self.position += self.global_batch
        return self.data.images[index].to(device), self.data.labels[index].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}  # the position says it all

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.position = int(checkpoint["position"])


class ShardBatches:
    """Each rank's own stream of the shards; the checkpoint holds every rank's position in its stream."""

    def __init__(
        self,
        open_loader: Callable[[dict[str, Any] | None], ShardLoader],
        comm: Comm,
        *,
        global_batch: int,
        workers: int,
    ) -> None:
        self.open_loader, self.comm, self.global_batch, self.workers = open_loader, comm, global_batch, workers
        self.position, self.saved = 0, None
        self._loader: ShardLoader | None = None

    @property
    def loader(self) -> ShardLoader:
        """The stream, opened on first use: at the resumed position when :meth:`load_state_dict` came first."""
        if self._loader is None:
            self._loader = self.open_loader(_rank_state(self.saved, self.comm, self.workers, self.position))
        return self._loader

    @property
    def bad(self) -> int:
        return self.loader.bad

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.position += self.global_batch
        return self.loader.next(device)

    def state_dict(self) -> dict[str, Any]:
        """The position, and every rank's stream position (per-worker offsets and the rest) for rank 0's file."""
        state = self.loader.state_dict()
        row = torch.tensor(state["offsets"] + [state[key] for key in DATA_FIELDS], dtype=torch.int64)
        table = torch.zeros(self.comm.world_size, len(row), dtype=torch.int64)
        table[self.comm.rank] = row
        table = self.comm.all_reduce(table, "sum")
        workers = len(state["offsets"])
        ranks = [
            {"offsets": r[:workers].tolist(), **dict(zip(DATA_FIELDS, r[workers:].tolist(), strict=True))}
            for r in table
        ]
        return {
            "position": self.position,
            "data": {"world_size": self.comm.world_size, "workers": workers, "ranks": ranks},
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        if self._loader is not None:
            raise RuntimeError("a shard stream resumes before its first batch")
        self.position, self.saved = int(checkpoint["position"]), checkpoint.get("data")


def check_data(cfg: Config, comm: Comm) -> ShardSet | ImageSet:
    """The shards or the bundled dataset of ``cfg.data``, checked against the model (a :class:`ConfigError` if
    they do not fit). Bundled data named as shards are written into the cache on first use, by rank 0 first."""
    if cfg.data.shards is None:
        data = load_builtin(cfg.data.dataset, cfg.model.resolution)
        if data.n_classes > cfg.model.n_classes:
            raise ConfigError(f"data.dataset {data.name} has {data.n_classes} classes but model.n_classes is smaller")
        return data
    spec = cfg.data.shards
    if spec in BUILTIN_DATASETS:
        if comm.rank == 0:
            spec = str(bundled_shards(spec, cfg.model.resolution))
        comm.barrier()  # the other ranks then find them (or, on another node, write their own)
        if comm.rank != 0:
            spec = str(bundled_shards(spec, cfg.model.resolution))
    shards = resolve_shards(spec)
    if shards.resolution is not None and shards.resolution != cfg.model.resolution:
        raise ConfigError(
            f"data.shards hold {shards.resolution} px images (manifest.json), model.resolution is "
            f"{cfg.model.resolution}"
        )
    if shards.num_classes is not None and shards.num_classes > cfg.model.n_classes:
        raise ConfigError(f"data.shards hold {shards.num_classes} classes but model.n_classes is smaller")
    return shards


def open_batches(cfg: Config, data: ShardSet | ImageSet, comm: Comm, *, global_batch: int) -> BatchSource:
    """The batch source of ``data`` (from :func:`check_data`), at the start; ``load_state_dict`` resumes it."""
    if isinstance(data, ImageSet):
        stream = IndexStream(len(data), seed=cfg.seed, rank=comm.rank, world_size=comm.world_size)
        return MemoryBatches(data, stream, global_batch)

    def open_loader(state: dict[str, Any] | None) -> ShardLoader:
        return ShardLoader(
            data,
            seed=cfg.seed,
            rank=comm.rank,
            world_size=comm.world_size,
            workers=cfg.data.num_workers,
            batch_size=global_batch // comm.world_size,
            resolution=cfg.model.resolution,
            num_classes=cfg.model.n_classes,
            resampled=cfg.data.resampled,
            max_bad_fraction=cfg.data.max_bad_fraction,
            state=state,
        )

    return ShardBatches(open_loader, comm, global_batch=global_batch, workers=cfg.data.num_workers)


def _rank_state(saved: dict[str, Any] | None, comm: Comm, workers: int, position: int) -> dict[str, Any] | None:
    """This rank's saved stream position, if the checkpoint was written by as many ranks and workers as now."""
    if saved is None:
        return None
    if saved["world_size"] == comm.world_size and saved["workers"] == max(workers, 1):
        return saved["ranks"][comm.rank]
    if comm.rank == 0:
        print(
            f"sgtrain: warning: the checkpoint's data position is for {saved['world_size']} ranks x {saved['workers']} "
            f"workers, this run has {comm.world_size} x {max(workers, 1)}: the streams restart from their beginning "
            f"after {position:,} images, so some samples are seen again before others",
            file=sys.stderr,
            flush=True,
        )
    return None
