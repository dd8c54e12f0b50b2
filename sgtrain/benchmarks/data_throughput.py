"""Loader throughput at 128 px: sgtrain's ``ShardLoader`` against raw webdataset decode of the same shards.

The data: ``--images`` synthetic photo-like JPEGs (smooth colour fields, filled shapes, a slight blur, luminance and
colour noise; random sizes 300-500 x 250-450 px, about ImageNet's 400 x 350; quality 90) in ``--classes`` class
folders under a temporary directory, turned into 128 px JPEG shards (quality 95, 4:4:4, ``--shard-size`` samples per
shard) by ``make_shards`` with 2 worker processes. The shard writing is timed once (images/s, a bonus figure).

What is timed, all on the same shards, read from the page cache (one untimed warm-up pass first):

1. **Raw decode on one core** (main process, ``torch.set_num_threads(1)``), one epoch of every shard:
   - ``wds torchrgb``: ``wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("torchrgb")
     .to_tuple("jpg", "cls")``, a float ``[3, R, R]`` tensor in [0, 1] per image: the baseline closest to what the
     loader produces (float ``[3, R, R]`` in [-1, 1]), so the ratio loader / raw is taken against it;
   - ``wds rgb8``: the same pipeline with ``decode("rgb8")``, a uint8 ``[R, R, 3]`` array per image (decode only);
   - ``PIL loop``: the tar members read with ``tarfile`` and ``Image.open(BytesIO(data)).convert("RGB")`` +
     ``np.asarray``, no webdataset at all.
2. **ShardLoader on one core**: ``workers=0`` (the main process decodes), ``batch_size=--batch``, ``resolution=128``,
   ``num_classes`` from the manifest, a fresh loader per repeat and ``.next()`` called for as many images as one epoch
   holds (rounded down to whole batches); everything the loader does is inside the timing (reading the tars, the
   seeded shuffle, decoding, the checks, ``float().div_(127.5).sub_(1.0)``, ``torch.stack``).
   The four one-core cases are interleaved, one epoch each per round, so that drift in the machine's speed hits all
   alike; the table gives the median over ``--repeats`` rounds.
3. **ShardLoader with worker processes**, ``workers=1`` and ``workers=2`` (DataLoader processes, prefetch 2): one
   loader per case, warmed up until every worker has delivered batches, then ``--repeats`` windows of one epoch's
   worth of images; the median window. The machine has 2 cores: with 2 workers the main process, which unpickles
   the batches, competes with them.
4. **Where the loader's time goes**: the loader's stages done as it does them, image after image over one epoch, with
   a clock around each (tar reading with ``read_shard``, PIL decode + convert, ``np.asarray(...).copy()`` +
   ``permute``, ``float().div_(127.5).sub_(1.0)``, ``torch.stack`` per batch), in microseconds per image, against
   the loader's measured time per image. And a PROTOTYPE (``PrototypeStream`` below, not sgtrain's code) of a cheaper
   batch assembly: the batch allocated once (in shared memory inside a worker), each image decoded by
   ``ShardStream._decode``, copied into it with one permuting copy and scaled in place; float batches are checked
   bit-identical to ``ShardLoader``'s; timed with workers=0 (in the interleaved one-core rounds) and workers=1, as
   float and as uint8 batches (uint8 leaves the scaling to the consumer, e.g. the GPU).
5. **Workers per GPU for ImageNet-128 BigGAN**: a G step of ``imagenet128.yaml`` consumes
   ``batch_size x d_steps = 2048 x 1`` real images (256 per GPU x 8 accumulation rounds on 8 GPUs), so a GPU consumes
   ``2048 x d_steps / (gpus x seconds per G step)`` images/s. The GPU step time cannot be measured here: it is the
   parameter ``--gpu-images-per-s`` (default 1500, an ASSUMPTION for BigGAN-128 D+G forward and backward in bf16 on
   one H100), shown next to the achieved FLOP/s it implies (``sgtrain.flops`` of the dense iteration, which sparse
   training with dense masked weights also costs). Workers per GPU = ceil(GPU images/s / one-core loader images/s).

Usage (from the repository root)::

    python benchmarks/data_throughput.py                          # 4000 images, 3 repeats: ~2 minutes on 2 cores
    python benchmarks/data_throughput.py --images 2000            # quicker
    python benchmarks/data_throughput.py --gpu-images-per-s 1000  # another assumption for the GPU's appetite
    python benchmarks/data_throughput.py --json results.json      # also write every figure as JSON

This is a benchmark: it prints figures and never asserts timings. It does check that every timed pass decoded the
images it claims (counts, shapes, value ranges) and stops otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import multiprocessing
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from sgtrain.benchmarks.harness import load_avg, machine, progress, write_json
from sgtrain.data.shards import make_shards
from sgtrain.data.stream import ShardLoader, ShardSet, ShardStream, read_shard, resolve_shards

RESOLUTION = 128
GOAL = 0.85  # issue 5: the loader within 15% of raw decode
H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, dense (no 2:4 sparsity), SXM


@dataclass(kw_only=True)
class Settings:
    """What to measure, and on how many images."""

    json: Path | None = None  # run() also writes every figure here
    images: int = 4000  # synthetic images, one epoch
    shard_size: int = 500  # samples per shard
    classes: int = 10  # class folders
    batch: int = 64  # ShardLoader batch size
    repeats: int = 3  # timed passes per case
    gpu_images_per_s: float = 1500.0  # ASSUMED real images/s one GPU consumes in BigGAN-128 training (H100, bf16)
    seed: int = 0  # of the synthetic images and the loader
    workdir: Path | None = None  # keep the images and shards here (None: a temporary directory, removed after)

    def __post_init__(self) -> None:
        if self.images < 2 * self.shard_size or self.shard_size < 1:
            raise ValueError("--images must be at least 2 x --shard-size (workers=2 needs a shard per worker)")
        if self.batch < 1 or self.images < self.batch or self.repeats < 1 or self.classes < 1:
            raise ValueError("--batch, --repeats and --classes must be >= 1 and --images >= --batch")
        if self.gpu_images_per_s <= 0:
            raise ValueError("--gpu-images-per-s must be > 0")


def median_rate(images: list[int], seconds: list[float]) -> dict[str, Any]:
    """Images/s of each timed pass, their median and spread (min, max), and the raw figures for the JSON."""
    rates = [n / s for n, s in zip(images, seconds, strict=True)]
    return {
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "n": len(rates),
        "images": images,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------------------------
# Synthetic photo-like source images and their shards.


def synthetic_jpeg(index: int, seed: int) -> bytes:
    """One photo-like JPEG: a smooth colour field, filled shapes, a slight blur, noise; about ImageNet's size."""
    rng = np.random.default_rng([seed, index])
    width, height = int(rng.integers(300, 501)), int(rng.integers(250, 451))
    field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(int(rng.integers(width)), int(rng.integers(height))) for _ in range(3)], fill=colour)
    image = image.filter(ImageFilter.BoxBlur(1))
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)  # luminance grain
    pixels = pixels + rng.integers(-5, 6, (height, width, 3), dtype=np.int16)  # colour noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_source_image(job: tuple[int, int, str]) -> int:
    index, seed, path = job
    data = synthetic_jpeg(index, seed)
    Path(path).write_bytes(data)
    return len(data)


def write_source(root: Path, images: int, classes: int, seed: int) -> dict[str, Any]:
    """``images`` JPEGs in ``root/class_XX/`` (round-robin classes), written by 2 processes."""
    for label in range(classes):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(i, seed, str(root / f"class_{i % classes:02d}" / f"img_{i:06d}.jpg")) for i in range(images)]
    start = time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        sizes = pool.map(_write_source_image, jobs, chunksize=32)
    return {
        "images": images,
        "classes": classes,
        "mean_bytes": statistics.mean(sizes),
        "s": time.perf_counter() - start,
    }


def write_shards(source: Path, out: Path, settings: Settings) -> dict[str, Any]:
    """``make_shards`` of the source folder at 128 px, timed (once: it takes a while and is not the topic)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its summary line is progress, not a result
        manifest = make_shards(
            f"imagefolder:{source}",
            out,
            resolution=RESOLUTION,
            shard_size=settings.shard_size,
            image_format="jpg",
            workers=2,
            quality=95,
            progress=False,
        )
    seconds = time.perf_counter() - start
    if manifest["skipped"] or manifest["num_samples"] != settings.images:
        raise SystemExit(
            f"make_shards wrote {manifest['num_samples']} of {settings.images} images: {manifest['skipped']}"
        )
    tar_bytes = sum((out / shard["name"]).stat().st_size for shard in manifest["shards"])
    return {
        "images": manifest["num_samples"],
        "shards": len(manifest["shards"]),
        "classes": manifest["num_classes"],
        "workers": 2,
        "seconds": seconds,
        "images_per_s": manifest["num_samples"] / seconds,
        "tar_bytes_per_image": tar_bytes / manifest["num_samples"],
    }


# --------------------------------------------------------------------------------------------------------------------
# The timed passes.


def pass_wds(urls: list[str], spec: str) -> tuple[int, float]:
    """One epoch of webdataset's own pipeline: (images, seconds)."""
    start = time.perf_counter()
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(spec).to_tuple("jpg", "cls")
    count, last = 0, None
    for sample in dataset:
        count, last = count + 1, sample
    seconds = time.perf_counter() - start
    image, label = last
    expected = (3, RESOLUTION, RESOLUTION) if spec.startswith("torch") else (RESOLUTION, RESOLUTION, 3)
    if tuple(image.shape) != expected or not isinstance(label, int):
        raise SystemExit(f"wds {spec}: last sample has shape {tuple(image.shape)} and label {label!r}")
    return count, seconds


def pass_pil(urls: list[str]) -> tuple[int, float]:
    """One epoch of a bare tarfile + PIL decode loop: (images, seconds)."""
    start = time.perf_counter()
    count = 0
    for url in urls:
        with tarfile.open(url, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                data = tar.extractfile(member).read()
                array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                count += 1
    seconds = time.perf_counter() - start
    if array.shape != (RESOLUTION, RESOLUTION, 3):
        raise SystemExit(f"PIL loop: last image has shape {array.shape}")
    return count, seconds


def new_loader(shards: ShardSet, workers: int, settings: Settings) -> ShardLoader:
    return ShardLoader(
        shards,
        seed=settings.seed,
        rank=0,
        world_size=1,
        workers=workers,
        batch_size=settings.batch,
        resolution=RESOLUTION,
        num_classes=shards.num_classes,
    )


def take(loader: ShardLoader, batches: int) -> int:
    """Pull ``batches`` batches and check them; the number of images."""
    count = 0
    for _ in range(batches):
        images, labels = loader.next()
        count += len(labels)
    if images.dtype != torch.float32 or tuple(images.shape[1:]) != (3, RESOLUTION, RESOLUTION):
        raise SystemExit(f"ShardLoader: batch of {images.dtype} {tuple(images.shape)}")
    if float(images.min()) < -1.0 or float(images.max()) > 1.0:
        raise SystemExit("ShardLoader: images outside [-1, 1]")
    return count


def pass_loader0(shards: ShardSet, settings: Settings) -> tuple[int, float]:
    """A fresh main-process loader, one epoch's worth of whole batches: (images, seconds)."""
    start = time.perf_counter()
    loader = new_loader(shards, 0, settings)
    count = take(loader, settings.images // settings.batch)
    return count, time.perf_counter() - start


ONE_CORE = {
    "wds_torchrgb": ("wds decode('torchrgb')", "float [3,R,R] in [0,1] per image"),
    "wds_rgb8": ("wds decode('rgb8')", "uint8 [R,R,3] per image"),
    "pil_loop": ("PIL loop over tar members", "uint8 [R,R,3] per image"),
    "loader_w0": ("ShardLoader workers=0", "float [B,3,R,R] in [-1,1] per batch"),
    "prototype_w0": ("PROTOTYPE stream workers=0", "float [B,3,R,R] in [-1,1] per batch"),
}


def bench_one_core(urls: list[str], shards: ShardSet, settings: Settings) -> dict[str, Any]:
    """The one-core cases, interleaved: one epoch each per round, a warm-up round first."""
    passes: dict[str, Callable[[], tuple[int, float]]] = {
        "wds_torchrgb": lambda: pass_wds(urls, "torchrgb"),
        "wds_rgb8": lambda: pass_wds(urls, "rgb8"),
        "pil_loop": lambda: pass_pil(urls),
        "loader_w0": lambda: pass_loader0(shards, settings),
        "prototype_w0": lambda: pass_prototype0(shards, settings),
    }
    figures: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in passes}
    for round_ in range(settings.repeats + 1):
        progress(f"one core: round {round_}/{settings.repeats}" + (" (warm-up)" if round_ == 0 else ""))
        for name, run in passes.items():
            count, seconds = run()
            if name in ("wds_torchrgb", "wds_rgb8", "pil_loop") and count != settings.images:
                raise SystemExit(f"{name}: decoded {count} images, the shards hold {settings.images}")
            if round_ > 0:
                figures[name][0].append(count)
                figures[name][1].append(seconds)
    return {name: median_rate(*figures[name]) for name in passes}


def bench_workers(shards: ShardSet, workers: int, settings: Settings) -> dict[str, Any]:
    """A loader with ``workers`` DataLoader processes: warm-up, then ``--repeats`` windows of one epoch's images."""
    progress(f"ShardLoader workers={workers}")
    start = time.perf_counter()
    loader = new_loader(shards, workers, settings)
    take(loader, 1)
    first_batch_s = time.perf_counter() - start
    take(loader, 4 * workers)  # every worker has started and filled its prefetch queue
    images, seconds = [], []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        images.append(take(loader, settings.images // settings.batch))
        seconds.append(time.perf_counter() - start)
    del loader  # shuts the worker processes down
    return {**median_rate(images, seconds), "workers": workers, "first_batch_s": first_batch_s}


# --------------------------------------------------------------------------------------------------------------------
# Where the loader's time goes, and a prototype of a cheaper batch assembly.


def bench_breakdown(urls: list[str], settings: Settings, loader_rate: float) -> dict[str, Any]:
    """Microseconds per image of each stage of the loader, done as the loader does them (image after image, batch
    after batch, so that caches behave alike) with a clock around each stage; median of ``--repeats`` epochs."""
    progress("breakdown of the loader's time")
    names = (
        "tar read (read_shard)",
        "PIL open + load + convert('RGB')",
        "np.asarray(...).copy() + permute",
        "float().div_(127.5).sub_(1.0)",
        "torch.stack",
    )
    totals: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    count = 0
    for _ in range(settings.repeats):
        spent = dict.fromkeys(names, 0.0)
        count = 0
        for url in urls:
            start = clock()
            samples = read_shard(url)
            spent[names[0]] += clock() - start
            batch: list[torch.Tensor] = []
            for _, data, _ in samples:
                t0 = clock()
                with Image.open(io.BytesIO(data)) as handle:
                    handle.load()
                    rgb = handle.convert("RGB")
                t1 = clock()
                array = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
                t2 = clock()
                batch.append(array.float().div_(127.5).sub_(1.0))
                t3 = clock()
                spent[names[1]] += t1 - t0
                spent[names[2]] += t2 - t1
                spent[names[3]] += t3 - t2
                count += 1
                if len(batch) == settings.batch:
                    start = clock()
                    torch.stack(batch)
                    spent[names[4]] += clock() - start
                    batch = []
        for name in names:
            totals[name].append(spent[name])
    per_image = {name: 1e6 * statistics.median(values) / count for name, values in totals.items()}
    loader_us = 1e6 / loader_rate
    return {
        "us_per_image": per_image,
        "sum_us_per_image": sum(per_image.values()),
        "loader_us_per_image": loader_us,
        # the seeded shuffle, label parsing, the checks, the generator and DataLoader plumbing
        "other_us_per_image": loader_us - sum(per_image.values()),
    }


class PrototypeStream(ShardStream):
    """PROTOTYPE, not sgtrain's code: ``ShardStream`` whose batches are allocated once per batch (in shared memory
    inside a DataLoader worker, so that sending it costs no copy) and filled image by image, from ``ShardStream``'s
    own ``_decode``, with one permuting copy (uint8 HWC -> CHW of ``dtype``), followed for float by
    ``div_(127.5).sub_(1.0)`` on that image while it is in cache: no per-image float tensor, no ``torch.stack``.
    Float batches are bit-identical to ShardStream's; uint8 batches leave the ``float().div_(127.5).sub_(1.0)`` to
    the consumer (on the GPU, after a 4x smaller copy)."""

    def __init__(self, *args: Any, dtype: torch.dtype, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dtype = dtype

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        slot = self.rank * self.workers + worker
        side, size = self.resolution, self.batch_size

        def fresh() -> torch.Tensor:
            images = torch.empty(size, 3, side, side, dtype=self.dtype)
            return images.share_memory_() if info is not None else images

        images, labels, bad = fresh(), [], 0
        for position, (key, url, image, label) in self._samples(slot, skip=self.offsets[worker]):
            decoded = self._decode(key, url, image, label)  # sgtrain's own decode and checks
            if decoded is None:
                bad += 1
            else:
                target = images[len(labels)]
                # HWC pixels into the CHW batch, one copy (numpy casts uint8 to float exactly for a float batch).
                target.permute(1, 2, 0).numpy()[:] = decoded[0]
                if self.dtype != torch.uint8:
                    target.div_(127.5).sub_(1.0)
                labels.append(decoded[1])
            if len(labels) == size:
                yield {
                    "images": images,
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "worker": worker,
                    "offset": position + 1,
                    "bad": bad,
                }
                images, labels, bad = fresh(), [], 0


def prototype_batches(shards: ShardSet, settings: Settings, workers: int, dtype: torch.dtype) -> Iterator[Any]:
    """The prototype stream in a DataLoader built as ``ShardLoader`` builds its own."""
    stream = PrototypeStream(
        shards,
        seed=settings.seed,
        rank=0,
        world_size=1,
        workers=max(workers, 1),
        batch_size=settings.batch,
        resolution=RESOLUTION,
        num_classes=shards.num_classes,
        dtype=dtype,
    )
    options: dict[str, Any] = {"batch_size": None, "num_workers": workers}
    if workers > 0:
        options["prefetch_factor"] = 2
    return iter(torch.utils.data.DataLoader(stream, **options))


def check_prototype(shards: ShardSet, settings: Settings) -> None:
    """The prototype's float batches are the loader's, bit for bit (same seed, same order, same arithmetic)."""
    batches, reference = prototype_batches(shards, settings, 0, torch.float32), new_loader(shards, 0, settings)
    for _ in range(3):
        if not torch.equal(next(batches)["images"], reference.next()[0]):
            raise SystemExit("the prototype stream's float batches differ from ShardLoader's")


def pass_prototype0(shards: ShardSet, settings: Settings) -> tuple[int, float]:
    """As :func:`pass_loader0`, for the prototype stream (float): (images, seconds)."""
    start = time.perf_counter()
    batches = prototype_batches(shards, settings, 0, torch.float32)
    count = sum(len(next(batches)["labels"]) for _ in range(settings.images // settings.batch))
    return count, time.perf_counter() - start


def bench_prototype_workers(shards: ShardSet, settings: Settings, dtype: torch.dtype) -> dict[str, Any]:
    """As :func:`bench_workers` with one worker process, for the prototype stream."""
    progress(f"prototype stream, {str(dtype).replace('torch.', '')}, workers=1")
    batches = prototype_batches(shards, settings, 1, dtype)
    for _ in range(5):
        next(batches)
    images, seconds = [], []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        images.append(sum(len(next(batches)["labels"]) for _ in range(settings.images // settings.batch)))
        seconds.append(time.perf_counter() - start)
    del batches  # shuts the worker process down
    return {**median_rate(images, seconds), "workers": 1, "dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------------------------------------
# Workers per GPU.


def workers_per_gpu(per_core: float, per_worker: float, settings: Settings) -> dict[str, Any]:
    """Worker processes per GPU to feed an ImageNet-128 BigGAN step at ``--gpu-images-per-s``: from the one-core
    (main process) rate, and from the rate of one DataLoader worker process, which is what training uses."""
    rate = settings.gpu_images_per_s
    out: dict[str, Any] = {
        "gpu_images_per_s": rate,
        "assumption": "BigGAN-128 D+G forward+backward, bf16, one H100 (not measured here)",
        "loader_images_per_s_per_core": per_core,
        "workers": math.ceil(rate / per_core),
        "loader_images_per_s_one_worker_process": per_worker,
        "workers_from_worker_process_rate": math.ceil(rate / per_worker),
        "recommended_with_25pct_headroom": math.ceil(1.25 * rate / min(per_core, per_worker)),
    }
    try:
        from sgtrain.config import load_config
        from sgtrain.flops import config_flops

        with contextlib.redirect_stdout(sys.stderr):
            cfg = load_config("imagenet128.yaml")
            report = config_flops(cfg)
        t = cfg.train
        reals = t.batch_size * t.d_steps
        flops_per_real = report["train_iteration"]["dense"] / reals
        out.update(
            {
                "config": "imagenet128.yaml",
                "batch_size": t.batch_size,
                "accumulation": t.accumulation,
                "d_steps": t.d_steps,
                "num_workers_in_config": cfg.data.num_workers,
                "real_images_per_g_step": reals,
                "dense_flops_per_real_image": flops_per_real,
                "implied_flop_per_s": flops_per_real * settings.gpu_images_per_s,
                "implied_h100_bf16_utilisation": flops_per_real * settings.gpu_images_per_s / H100_BF16_DENSE_PEAK,
                "g_step_s_on_8_gpus": reals / (8 * settings.gpu_images_per_s),
            }
        )
    except Exception as error:  # the FLOPs are context, not the figure: report and go on
        out["flops_error"] = f"{type(error).__name__}: {error}"
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report.


def print_report(result: dict[str, Any]) -> None:
    """The tables of a :func:`run` result, on stdout."""
    meta, data, one = result["meta"], result["data"], result["one_core"]
    print(f"sgtrain data throughput at {RESOLUTION} px   {meta['date']}")
    print(f"torch {meta['torch']}, webdataset {meta['webdataset']}, Pillow {meta['pillow']}, CPU {meta['cpu_model']}")
    print(f"({meta['cpus']} logical); load average (1 min) {meta['load_avg_start'][0]:.2f} at start, ", end="")
    print(f"{meta['load_avg_end'][0]:.2f} at end")
    src, sh = data["source"], data["shards"]
    print(
        f"data: {src['images']} synthetic JPEGs ~400x350 (mean {src['mean_bytes'] / 1e3:.1f} kB), {src['classes']} "
        f"classes -> {sh['shards']} shards of {meta['args']['shard_size']}, 128 px JPEG q95 4:4:4, "
        f"{sh['tar_bytes_per_image'] / 1e3:.1f} kB per sample in the tars"
    )
    base = one["wds_torchrgb"]["images_per_s"]
    print()
    print(f"median of {meta['args']['repeats']} timed passes of one epoch each; ratio = images/s / wds torchrgb's")
    print(f"   {'what':<44}{'output':<38}{'images/s':>10}{'min-max':>15}{'ratio':>8}")

    def row(label: str, output: str, figures: dict[str, Any], ratio: bool = True) -> None:
        spread = f"{figures['min']:.0f}-{figures['max']:.0f}"
        r = f"{figures['images_per_s'] / base:.3f}" if ratio else ""
        print(f"   {label:<44}{output:<38}{figures['images_per_s']:>10.0f}{spread:>15}{r:>8}")

    print("   one core (main process, 1 torch thread):")
    for name, (label, output) in ONE_CORE.items():
        row(f"  {label}", output, one[name])
    print("   ShardLoader with DataLoader worker processes (2 cores in all):")
    for figures in result["workers"]:
        row(f"  workers={figures['workers']}", "float [B,3,R,R] in [-1,1] per batch", figures)
    write = {**sh, "min": sh["images_per_s"], "max": sh["images_per_s"]}
    print("   shard writing (decode ~400x350, crop, resize, encode, tar; n=1):")
    row("  make_shards workers=2", "128 px JPEG q95 in tars", write, ratio=False)

    print("   PROTOTYPE (not sgtrain's code; see PrototypeStream): preallocated batch, in-place copy_ per image:")
    for figures in result["prototype_workers"]:
        output = "float [B,3,R,R] in [-1,1] per batch" if figures["dtype"] == "float32" else "uint8 [B,3,R,R] per batch"
        row(f"  workers={figures['workers']}, {figures['dtype']}", output, figures)

    ratio = result["ratio"]
    verdict = "MET" if ratio >= GOAL else "MISSED"
    print()
    print(
        f"goal (issue 5): ShardLoader workers=0 / wds torchrgb >= {GOAL:.2f}: {ratio:.3f} -> {verdict}"
        f"   (against wds rgb8, decode only: {one['loader_w0']['images_per_s'] / one['wds_rgb8']['images_per_s']:.3f})"
    )

    br = result["breakdown"]
    print()
    print(
        f"where ShardLoader's time goes, us per image (its stages with a clock around each, median of "
        f"{meta['args']['repeats']} epochs):"
    )
    for name, us in br["us_per_image"].items():
        print(f"   {name:<56}{us:>8.1f}")
    print(f"   {'sum of the stages':<56}{br['sum_us_per_image']:>8.1f}")
    print(f"   {'ShardLoader workers=0, measured above (1 / rate)':<56}{br['loader_us_per_image']:>8.1f}")
    print(f"   {'  rest: shuffle, labels, checks, generator, DataLoader':<56}{br['other_us_per_image']:>8.1f}")

    wg = result["workers_per_gpu"]
    print()
    print("workers per GPU to feed ImageNet-128 BigGAN:")
    if "flops_error" not in wg:
        print(
            f"   {wg['config']}: a G step consumes batch_size x d_steps = {wg['batch_size']} x {wg['d_steps']} = "
            f"{wg['real_images_per_g_step']} real images ({wg['batch_size'] // 8} per GPU x {wg['accumulation']} "
            "accumulation rounds on 8 GPUs)"
        )
    print("   images/s one GPU consumes = batch_size x d_steps / (GPUs x seconds per G step)")
    print(f"   ASSUMED --gpu-images-per-s {wg['gpu_images_per_s']:.0f} ({wg['assumption']})")
    if "flops_error" not in wg:
        print(
            f"   = a G step every {wg['g_step_s_on_8_gpus']:.2f} s on 8 GPUs, "
            f"{wg['dense_flops_per_real_image'] / 1e9:.0f} GFLOPs per real image x {wg['gpu_images_per_s']:.0f}/s = "
            f"{wg['implied_flop_per_s'] / 1e12:.0f} TFLOP/s achieved, {100 * wg['implied_h100_bf16_utilisation']:.0f}% "
            "of an H100's dense bf16 peak (989 TFLOP/s)"
        )
    else:
        print(f"   (FLOPs not computed: {wg['flops_error']})")
    print(
        f"   workers = ceil({wg['gpu_images_per_s']:.0f} / {wg['loader_images_per_s_per_core']:.0f} one-core "
        f"loader images/s) = {wg['workers']}; from one DataLoader worker process's rate: "
        f"ceil({wg['gpu_images_per_s']:.0f} / {wg['loader_images_per_s_one_worker_process']:.0f}) = "
        f"{wg['workers_from_worker_process_rate']}"
    )
    config_workers = (
        f"; imagenet128.yaml sets data.num_workers {wg['num_workers_in_config']}" if "flops_error" not in wg else ""
    )
    print(
        f"   recommended, slower rate with 25% headroom: {wg['recommended_with_25pct_headroom']} workers per GPU, "
        f"each on a core of its own, plus a core for the training process{config_workers}"
    )
    print("   (cores of this benchmark machine; a server core may decode faster or slower: rerun this there)")
    print(f"\n(total wall time {meta['wall_s']:.0f} s)")


def run(settings: Settings) -> dict[str, Any]:
    """Every figure of the module docstring, ``{"meta", "data", "one_core", "workers", "prototype_workers", "ratio",
    "goal", "breakdown", "workers_per_gpu"}``; also written to ``settings.json`` when set."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    versions = {"webdataset": getattr(wds, "__version__", "unknown"), "pillow": Image.__version__}
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}
    meta = machine("date", "torch") | versions | machine("python", "cpu_model", "cpus", "threads", "load_avg_start")
    result: dict[str, Any] = {"meta": meta | {"args": args}}
    keep = settings.workdir is not None
    workdir = settings.workdir if keep else Path(tempfile.mkdtemp(prefix="sgtrain-data-throughput-"))
    try:
        source, out = workdir / "source", workdir / "shards"
        if out.exists():
            raise SystemExit(f"{out} already exists: choose another --workdir")
        progress(f"writing {settings.images} synthetic images to {source}")
        result["data"] = {"source": write_source(source, settings.images, settings.classes, settings.seed)}
        progress(f"writing 128 px shards to {out}")
        result["data"]["shards"] = write_shards(source, out, settings)
        shards = resolve_shards(str(out))
        urls = shards.urls

        check_prototype(shards, settings)
        result["one_core"] = bench_one_core(urls, shards, settings)
        result["workers"] = [bench_workers(shards, workers, settings) for workers in (1, 2)]
        result["prototype_workers"] = [
            bench_prototype_workers(shards, settings, dt) for dt in (torch.float32, torch.uint8)
        ]
        per_core = result["one_core"]["loader_w0"]["images_per_s"]
        result["ratio"] = per_core / result["one_core"]["wds_torchrgb"]["images_per_s"]
        result["goal"] = GOAL
        result["breakdown"] = bench_breakdown(urls, settings, per_core)
        progress("workers per GPU (FLOPs of imagenet128.yaml)")
        result["workers_per_gpu"] = workers_per_gpu(per_core, result["workers"][0]["images_per_s"], settings)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["meta"]["load_avg_end"] = load_avg()
    result["meta"]["wall_s"] = time.perf_counter() - start
    if settings.json is not None:
        write_json(settings.json, result)
    return result
