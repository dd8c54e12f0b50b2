"""Training images streamed from webdataset tar shards: disjoint per rank and worker, seeded, resumable exactly.

Each (rank, worker) pair is a *slot*; slot ``s`` of ``S = ranks x workers`` owns the shards ``s, s + S, s + 2S, ...``
(non-resampled mode), so slots read disjoint samples and together cover every shard once per epoch. A slot's stream
is infinite and a pure function of ``(seed, slot)``: epoch ``e`` visits the slot's shards in an order drawn from
``(seed, slot, e)`` and each shard's samples in an order drawn from ``(seed, e, shard)`` - a seeded shuffle buffer of
one shard. In resampled mode every draw picks any shard at random from ``(seed, slot, draw)``. So where a slot stands
is one integer, the number of raw samples it has consumed, and a resumed run skips exactly that many (whole shards
without opening them when the manifest gives their sizes) and continues with the very samples the uninterrupted run
would have read next.

``torch.utils.data.DataLoader`` returns worker batches round-robin, always starting at worker 0; after a resume the
next batch belongs to some other worker, so DataLoader worker ``p`` plays logical worker ``(p + rotation) % W``.

Shard files and URLs are opened with webdataset's ``gopen`` (local paths, ``pipe:``, http, ...); the tar members are
read here, so that the order of samples is ours to decide.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sgtrain.config import ConfigError
from sgtrain.stopping import ignore_stop_signals

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class DataError(RuntimeError):
    """The data of a run is unusable (too many corrupt samples, an image of the wrong size, a label out of range)."""


@dataclass(frozen=True)
class ShardSet:
    """The shards of a dataset: URLs in order, and what their manifest says when there is one."""

    urls: list[str]
    counts: list[int] | None = None  # samples per shard (manifest), so resumes can skip shards unopened
    resolution: int | None = None
    num_classes: int | None = None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(spec: str) -> ShardSet:
    """The shards ``spec`` names: a brace pattern (``/data/train-{000000..000639}.tar``), a local directory (its
    ``manifest.json``, else every ``*.tar`` in it) or any URL webdataset opens (``pipe:``, ``http://``, ...)."""
    from webdataset.shardlists import expand_urls

    if _is_local(spec) and Path(spec).is_dir():
        directory = Path(spec)
        if (directory / "manifest.json").is_file():
            manifest = _read_manifest(directory / "manifest.json")
            urls = [str(directory / shard["name"]) for shard in manifest["shards"]]
        else:
            urls = sorted(str(path) for path in directory.glob("*.tar"))
    else:
        urls = list(expand_urls(spec))
    if not urls:
        raise ConfigError(f"data.shards: {spec!r} names no shards")
    local = [url for url in urls if _is_local(url)]
    missing = [url for url in local if not Path(url).is_file()]
    if missing:
        raise ConfigError(f"data.shards: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    # A manifest beside local shards gives their sizes, resolution and classes.
    manifest_path = Path(local[0]).parent / "manifest.json" if len(local) == len(urls) else None
    if manifest_path is None or not manifest_path.is_file():
        return ShardSet(urls)
    manifest = _read_manifest(manifest_path)
    sizes = {shard["name"]: int(shard["count"]) for shard in manifest["shards"]}
    counts = [sizes.get(Path(url).name) for url in urls]
    return ShardSet(
        urls,
        counts=None if None in counts else counts,  # type: ignore[arg-type] (checked)
        resolution=int(manifest["resolution"]),
        num_classes=int(manifest["num_classes"]),
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        missing = [key for key in ("shards", "resolution", "num_classes") if key not in manifest]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"data.shards: {path} is not an sgtrain shard manifest ({error})") from None
    return manifest


def _generator(*parts: int) -> torch.Generator:
    """A torch RNG seeded by integers (never ``hash()``, which is salted per process)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def read_shard(url: str) -> list[tuple[str, bytes | None, str | None]]:
    """Samples of one tar shard in file order: ``(key, image bytes, class text)``, None for a missing part."""
    import webdataset as wds

    samples: dict[str, dict[str, bytes]] = {}
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.rpartition("/")[2].partition(".")
                handle = tar.extractfile(member)
                samples.setdefault(key, {})[extension.lower()] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError) as error:  # a damaged archive, not a damaged sample: nothing to skip to
        raise DataError(
            f"{url} is not a readable tar shard ({error}): check it against the sha256 in its manifest.json"
        ) from None
    out = []
    for key, parts in samples.items():
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        label = parts.get("cls")
        out.append((key, image, label.decode() if label is not None else None))
    return out


class ShardStream(torch.utils.data.IterableDataset):
    """Micro-batches ``{"images": [B, 3, R, R] uint8, "labels": [B] int64, ...}`` of one rank's slots.

    Each batch also says which logical worker made it, that worker's raw-sample offset after it, and how many
    corrupt samples it skipped; :class:`ShardLoader` keeps those as the resumable position.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        batch_size: int,
        resolution: int,
        num_classes: int,
        resampled: bool = False,
        offsets: list[int] | None = None,
        rotation: int = 0,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.batch_size, self.resolution, self.num_classes = batch_size, resolution, num_classes
        self.resampled = resampled
        self.offsets = list(offsets) if offsets is not None else [0] * workers
        self.rotation = rotation
        slots = world_size * workers
        if not resampled and len(shards.urls) < slots:
            raise ConfigError(
                f"data.shards: {len(shards.urls)} shards for {world_size} ranks x {workers} workers: every "
                "(rank, worker) needs a shard of its own (write more, smaller shards, or set data.resampled: true)"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        slot = self.rank * self.workers + worker
        offset = self.offsets[worker]
        # Batches travel from worker processes as uint8, a quarter of float32: through shared memory that copy
        # cost a third of a worker's throughput (benchmarks/data_throughput.py). ShardLoader scales them.
        shape = (self.batch_size, 3, self.resolution, self.resolution)
        images = torch.empty(shape, dtype=torch.uint8)
        labels: list[int] = []
        bad = 0
        for position, (key, url, image, label) in self._samples(slot, skip=offset):
            decoded = self._decode(key, url, image, label)
            if decoded is None:
                bad += 1
                continue
            images[len(labels)].permute(1, 2, 0).numpy()[:] = decoded[0]  # HWC pixels into the CHW batch, one copy
            labels.append(decoded[1])
            if len(labels) == self.batch_size:
                yield {
                    "images": images,
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "worker": worker,
                    "offset": position + 1,
                    "bad": bad,
                }
                images, labels, bad = torch.empty(shape, dtype=torch.uint8), [], 0

    def _samples(self, slot: int, skip: int) -> Iterator[tuple[int, tuple[str, str, bytes | None, str | None]]]:
        """``(raw position, (key, url, image bytes, class text))`` of slot ``slot``'s infinite stream from ``skip``."""
        urls, counts = self.shards.urls, self.shards.counts
        mine = (
            list(range(len(urls))) if self.resampled else list(range(slot, len(urls), self.world_size * self.workers))
        )
        position = 0
        draw = 0
        while True:
            if self.resampled:  # one shard per draw, with replacement
                index = mine[int(torch.randint(len(mine), (1,), generator=_generator(self.seed, slot, draw)))]
                visits = [(index, _generator(self.seed, 1, slot, draw))]
                draw += 1
            else:  # one epoch of this slot's shards
                order = torch.randperm(len(mine), generator=_generator(self.seed, 0, slot, draw)).tolist()
                visits = [(mine[i], _generator(self.seed, 2, draw, mine[i])) for i in order]
                draw += 1
            for index, generator in visits:
                if counts is not None and position + counts[index] <= skip:
                    position += counts[index]  # the whole shard lies before the resume point: not even opened
                    continue
                samples = read_shard(urls[index])
                for i in torch.randperm(len(samples), generator=generator).tolist():
                    if position >= skip:
                        key, image, label = samples[i]
                        yield position, (key, urls[index], image, label)
                    position += 1

    def _decode(self, key: str, url: str, image: bytes | None, label: str | None) -> tuple[np.ndarray, int] | None:
        """The image (uint8 ``[R, R, 3]``) and its label, or None for a corrupt sample (which the caller counts)."""
        try:
            with Image.open(io.BytesIO(image or b"")) as handle:
                handle.load()
                rgb = handle.convert("RGB")
            value = int(label) if label is not None else None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
        if value is None:
            return None
        if rgb.size != (self.resolution, self.resolution):
            raise DataError(
                f"{url}: sample {key} is {rgb.size[0]}x{rgb.size[1]} px, the run trains at {self.resolution} px "
                "(write the shards with make-shards --resolution to match model.resolution)"
            )
        if not 0 <= value < self.num_classes:
            raise DataError(f"{url}: sample {key} has class {value}, but model.n_classes is {self.num_classes}")
        return np.asarray(rgb, dtype=np.uint8), value


class ShardLoader:
    """One rank's micro-batches from the shards, its resumable position and its corrupt-sample count."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        batch_size: int,
        resolution: int,
        num_classes: int,
        resampled: bool = False,
        max_bad_fraction: float = 0.001,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.logical_workers = max(workers, 1)  # 0 workers: the main process plays the one logical worker
        self.offsets = list(state["offsets"]) if state else [0] * self.logical_workers
        self.next_worker = int(state["next"]) if state else 0
        self.good = int(state["good"]) if state else 0
        self.bad = int(state["bad"]) if state else 0
        self.max_bad_fraction = max_bad_fraction
        dataset = ShardStream(
            shards,
            seed=seed,
            rank=rank,
            world_size=world_size,
            workers=self.logical_workers,
            batch_size=batch_size,
            resolution=resolution,
            num_classes=num_classes,
            resampled=resampled,
            offsets=self.offsets,
            rotation=self.next_worker,
        )
        options: dict[str, Any] = {"batch_size": None, "num_workers": workers}  # the stream batches itself
        if workers > 0:
            options["prefetch_factor"] = 2
            options["worker_init_fn"] = ignore_stop_signals  # a stop signal to the process group is the trainer's
        self._batches = iter(torch.utils.data.DataLoader(dataset, **options))

    def next(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch on ``device``: ``(images [B, 3, R, R] float in [-1, 1], labels [B] int64)``."""
        try:
            batch = next(self._batches)
        except DataError as error:  # from a worker process: keep its own words, not the wrapped traceback
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
        self.offsets[batch["worker"]] = batch["offset"]
        self.next_worker = (batch["worker"] + 1) % self.logical_workers
        self.good += len(batch["labels"])
        self.bad += batch["bad"]
        if self.bad > max(10, self.max_bad_fraction * (self.good + self.bad)):
            raise DataError(
                f"{self.bad} of {self.good + self.bad} samples read so far could not be decoded, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}: check the shards (sha256 in their manifest.json)"
            )
        # Scaled on the device: the host-to-device copy moves uint8, a quarter of the bytes.
        images = batch["images"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        return images, batch["labels"].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "next": self.next_worker, "good": self.good, "bad": self.bad}
