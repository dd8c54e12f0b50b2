"""Write webdataset shards from an image folder, an ``.npz`` file, the CIFAR-10 python release or a bundled dataset
(BigGAN preprocessing).

Layout of the output directory::

    train-000000.tar     up to shard_size samples, each two members: 000000042.jpg (or .png) and 000000042.cls
    train-000001.tar     (the key is the sample's global index, 9 digits; .cls is the class index in ASCII)
    ...
    classes.json         {"class name": index} in index order
    manifest.json        format, source, resolution, counts, per-shard count and sha256, skipped files: written
                         last, so its presence marks a complete set of shards

Samples are in source order (classes sorted, then files sorted by relative path; CIFAR-10: its batches in
order), not shuffled: the reader shuffles. Images are centre-cropped to a square of the short side, resized with
antialiasing and stored as RGB, so the training loop only decodes. The bytes written depend only on the source and
the options, never on the number of worker processes, and tar members carry no time or owner, so rerunning gives
identical shards.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sgtrain.checkpoint import write_atomic
from sgtrain.config import ConfigError
from sgtrain.data.builtin import BUILTIN_DATASETS, load_builtin
from sgtrain.data.cifar import cifar10_location, read_cifar10

SHARD_FORMAT = "sgtrain-shards/1"
IMAGE_FORMATS = ("jpg", "png")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
_MAX_LISTED = 20  # skipped paths printed at the end; all of them are in the manifest


def _default_workers() -> int:
    # The CPUs this process may run on (a Slurm allocation, taskset), not all the machine's cores.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _image_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """Class names, image paths relative to ``root`` and their labels, in sample order."""
    if not root.is_dir():
        raise ConfigError(f"imagefolder source {root} is not a directory")
    # Hidden folders (.ipynb_checkpoints, .Trash) are not classes.
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ConfigError(f"imagefolder source {root} has no class subfolders (expected {root}/<class>/<image>)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = []
        for folder, subfolders, files in os.walk(root / name, followlinks=True):
            subfolders[:] = [sub for sub in subfolders if not sub.startswith(".")]
            relative = Path(folder).relative_to(root)
            found += [(relative / file).as_posix() for file in files if Path(file).suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            empty.append(name)
        paths += sorted(found)
        labels += [label] * len(found)
    if empty:
        # A class with no images would be a label the generator is asked for but the discriminator never sees.
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ConfigError(f"imagefolder source {root}: class folders without image files: {shown}")
    return classes, paths, labels


def _array_images(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as ``[N, H, W]`` or ``[N, H, W, 3]`` uint8, from any of the accepted layouts."""
    if x.dtype != np.uint8:
        raise ConfigError(f"{where}: x must be uint8, got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1:
        return x[..., 0]
    if x.ndim == 4 and x.shape[-1] == 3:
        return x
    if x.ndim == 4 and x.shape[1] == 3:
        return x.transpose(0, 2, 3, 1)
    if x.ndim == 3:
        return x
    raise ConfigError(f"{where}: x must have shape [N,H,W], [N,H,W,1], [N,H,W,3] or [N,3,H,W], got {list(x.shape)}")


def _array_labels(y: np.ndarray, num_images: int, where: str) -> tuple[list[str], list[int]]:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{where}: y must be a 1-d integer array, got {y.dtype} of shape {list(y.shape)}")
    if len(y) != num_images:
        raise ConfigError(f"{where}: x holds {num_images} images but y holds {len(y)} labels")
    distinct = np.unique(y)
    if len(distinct) == 0 or distinct[0] != 0 or distinct[-1] != len(distinct) - 1:
        raise ConfigError(f"{where}: labels must be 0..C-1 with every class present, got {distinct.tolist()[:10]}")
    return [str(label) for label in range(len(distinct))], y.astype(np.int64).tolist()


def _read_source(source: str, resolution: int) -> tuple[list[str], list[str], list[int], list[str | np.ndarray]]:
    """``(classes, names, labels, items)``: an item is a file path or a uint8 image array, ``names`` label skips."""
    kind, _, location = source.partition(":")
    if kind == "imagefolder" and location:
        root = Path(location).expanduser()
        classes, relative, labels = _image_folder(root)
        return classes, relative, labels, [str(root / path) for path in relative]
    if kind == "cifar10" and location:
        # Class names and indices come from batches.meta, not from the labels seen, so a split is never renumbered.
        classes, names, images, y = read_cifar10(*cifar10_location(location))
        return classes, names, y.tolist(), list(_array_images(images, f"cifar10 source {location}"))
    if kind == "npz" and location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise ConfigError(f"npz source {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in ("x", "y") if name in archive.files}
        except (OSError, ValueError, AttributeError) as error:  # not a zip, a pickle, or a bare .npy array
            raise ConfigError(f"npz source {path} is not a readable .npz file ({error})") from None
        if set(arrays) != {"x", "y"}:
            raise ConfigError(f"npz source {path} must hold arrays x (images) and y (labels), found {sorted(arrays)}")
        x, y = arrays["x"], arrays["y"]
        images = _array_images(x, f"npz source {path}")
    elif source in BUILTIN_DATASETS:
        try:
            bundled = load_builtin(source, resolution)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
        # The same framed images the in-memory path trains on (digit in the central 7/8), as 8-bit grey: already
        # square and at the resolution, so the crop and resize below leave them as they are.
        grey = bundled.images[:, 0].add(1.0).mul(127.5).round().clamp(0, 255)
        images, y = grey.to(torch.uint8).numpy(), bundled.labels.numpy()
    else:
        raise ConfigError(
            f"unknown shard source {source!r}: use imagefolder:PATH, npz:PATH, cifar10:PATH[:train|:test] or one of "
            f"{', '.join(BUILTIN_DATASETS)}"
        )
    classes, labels = _array_labels(y, len(images), f"{source} source")
    return classes, [f"x[{i}]" for i in range(len(images))], labels, list(images)


def _encode(item: str | np.ndarray, *, resolution: int, image_format: str, quality: int) -> tuple[bytes | None, str]:
    """One sample's encoded image, or ``(None, reason)`` when the file cannot be decoded. Runs in a worker."""
    try:
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item).convert("RGB")
        else:
            with Image.open(item) as opened:
                # Decoding is lazy: load() here so a truncated file fails inside this try, not at resize.
                # (ImageFile.LOAD_TRUNCATED_IMAGES stays False: a half-grey image is not a training sample.)
                opened.load()
                # Grey, palette, RGBA (alpha dropped, as torchvision's loader does) and CMYK all become RGB.
                image = opened.convert("RGB")
    except Exception as error:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        return None, f"{type(error).__name__}: {error}"
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop first, as BigGAN's CenterCropLongEdge: resize(box=...) would let the kernel read pixels outside the square.
    image = image.crop((left, top, left + side, top + side))
    # PIL widens the bicubic kernel by the scale factor when downscaling, so every source pixel in the footprint
    # contributes: the resize is antialiased (torch's interpolate is not, without antialias=True). A source
    # smaller than the target is upsampled with the same filter.
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "jpg":
        # 4:4:4 (no chroma subsampling): at 128 px and below, halving colour resolution visibly blurs edges.
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue(), ""


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    # No time, owner or permissions from this machine: identical inputs give identical bytes.
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info, io.BytesIO(data)


def _write_shard(path: Path, samples: Iterable[tuple[int, int, bytes]], suffix: str) -> dict:
    """Write ``(key, label, image bytes)`` samples to the tar ``path`` atomically; its manifest entry."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, label, data in samples:
                tar.addfile(*_member(f"{key:09d}.{suffix}", data))
                tar.addfile(*_member(f"{key:09d}.cls", str(label).encode("ascii")))
                count += 1
        handle.flush()
        os.fsync(handle.fileno())
    digest = hashlib.sha256()
    with open(tmp, "rb") as handle:  # read back from the page cache: cheap next to encoding
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    os.replace(tmp, path)
    return {"name": path.name, "count": count, "sha256": digest.hexdigest()}


def _write_json(path: Path, value: dict) -> None:
    write_atomic(path, (json.dumps(value, indent=1) + "\n").encode())


def make_shards(
    source: str,
    out: str | Path,
    *,
    resolution: int,
    shard_size: int = 2000,
    image_format: str = "jpg",
    workers: int | None = None,
    quality: int = 95,
    progress: bool = True,
    final: str | Path | None = None,
) -> dict:
    """Preprocess ``source`` to ``resolution`` px RGB and write it as tar shards in ``out``; the manifest.

    ``source`` is ``imagefolder:PATH`` (one subfolder per class), ``npz:PATH`` (uint8 ``x`` of shape ``[N,H,W]``,
    ``[N,H,W,1]``, ``[N,H,W,3]`` or ``[N,3,H,W]`` and integer labels ``y`` in 0..C-1), ``cifar10:PATH`` (the
    official ``cifar-10-python.tar.gz`` or its extracted folder: the 50,000 training images; ``cifar10:PATH:test``
    the 10,000 test images) or a bundled dataset name.
    Files that cannot be decoded are skipped and listed in the manifest. Raises :class:`ConfigError`, before
    writing anything, for a bad source or options, or an ``out`` that already holds shards.
    """
    if resolution < 1 or shard_size < 1:
        raise ConfigError(f"resolution and shard_size must be >= 1, got {resolution} and {shard_size}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"shard output {out} exists and is not a directory")
    if out.is_dir() and ((out / "manifest.json").exists() or any(out.glob("train-*.tar"))):
        raise ConfigError(f"shard output {out} already holds shards; delete them or choose another directory")
    classes, names, labels, items = _read_source(source, resolution)

    out.mkdir(parents=True, exist_ok=True)
    encode = functools.partial(_encode, resolution=resolution, image_format=image_format, quality=quality)
    workers = min(workers, len(items))
    # Ordered imap: results come back in source order whatever the number of workers, so the bytes do not
    # depend on it. Chunks amortise the pickling round trip without starving workers near the end.
    chunksize = max(1, min(64, len(items) // (workers * 8)))
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(encode, items, chunksize) if pool else map(encode, items)
        bar = tqdm(results, total=len(items), unit="img", desc="make-shards", disable=not progress)
        skipped: list[dict] = []
        per_class = [0] * len(classes)

        def good_samples() -> Iterator[tuple[int, int, bytes]]:
            key = 0
            for name, label, (data, error) in zip(names, labels, bar, strict=True):
                if data is None:
                    skipped.append({"path": name, "error": error})
                    continue
                per_class[label] += 1
                yield key, label, data
                key += 1

        samples = good_samples()
        shards = []
        for index in itertools.count():
            # Peek so that no empty shard is ever created.
            first = next(samples, None)
            if first is None:
                break
            batch = itertools.chain([first], itertools.islice(samples, shard_size - 1))
            shards.append(_write_shard(out / f"train-{index:06d}.tar", batch, image_format))
        bar.close()

    num_samples = sum(shard["count"] for shard in shards)
    if num_samples == 0:
        raise ConfigError(f"shard source {source}: none of its {len(items)} images could be decoded")
    # write_atomic fsyncs the directory, which also makes the shard renames durable before the manifest is written.
    _write_json(out / "classes.json", {name: index for index, name in enumerate(classes)})
    manifest = {
        "format": SHARD_FORMAT,
        "source": source,
        "resolution": resolution,
        "image_format": image_format,
        "num_samples": num_samples,
        "num_classes": len(classes),
        "classes_file": "classes.json",
        "shards": shards,
        "skipped": skipped,
        "per_class": per_class,
    }
    _write_json(out / "manifest.json", manifest)

    print(
        f"make-shards: {num_samples} samples in {len(shards)} shards, {len(classes)} classes, "
        f"{len(skipped)} skipped -> {final or out}"  # final: where a scratch directory is renamed to
    )
    for entry in skipped[:_MAX_LISTED]:
        print(f"  skipped {entry['path']}: {entry['error']}", file=sys.stderr)
    if len(skipped) > _MAX_LISTED:
        print(f"  ... and {len(skipped) - _MAX_LISTED} more (manifest.json lists all)", file=sys.stderr)
    return manifest


BUNDLED_SHARD_SIZE = 64  # small shards, so that many (rank, worker) slots each get their own: digits makes 29


def bundled_shards(name: str, resolution: int, cache: str | Path | None = None) -> Path:
    """Shards of the bundled dataset ``name`` at ``resolution`` px, written on first use into the cache
    (``$SGTRAIN_CACHE``, else ``~/.cache/sgtrain``) and reused afterwards; nothing is downloaded.

    Each caller writes into its own temporary directory and renames it into place, so processes that race (the
    ranks of a job, two runs) never see a half-written set: the first rename wins and the others discard theirs.
    """
    root = Path(cache or os.environ.get("SGTRAIN_CACHE") or Path.home() / ".cache" / "sgtrain").expanduser()
    target = root / "shards" / f"{name}-{resolution}px-{SHARD_FORMAT.replace('/', '-')}"
    if (target / "manifest.json").is_file():
        return target
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    make_shards(
        name,
        scratch,
        resolution=resolution,
        shard_size=BUNDLED_SHARD_SIZE,
        image_format="png",
        workers=1,
        progress=False,
        final=target,
    )
    try:
        scratch.rename(target)
    except OSError:  # another process put its copy in place first
        shutil.rmtree(scratch, ignore_errors=True)
    return target
