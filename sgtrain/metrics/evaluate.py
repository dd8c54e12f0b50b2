"""`sgtrain evaluate`: FID, KID, IS and precision/recall of a run's EMA generator against its training data.

The generated images are sharded over ranks by sample index (``sgtrain.sampling``), their features gathered, and
the numbers computed on every rank from the same gathered features, so 2 ranks report exactly what 1 rank does
(up to the extractor's batch arithmetic). Real-image features are computed once per dataset, extractor, protocol
and sample count, and cached (written atomically).

Extractor: runs on bundled digits use the small classifier trained on them (``sgtrain.metrics.classifier``): its
Fréchet distance, IS analogue and classes-covered count are the meaningful numbers for 8x8-32x32 digits. Every other
run uses the standard TF-Inception (2048-d pool features, ``sgtrain.metrics.features``) from a local file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sgtrain.checkpoint import write_atomic
from sgtrain.comm import Comm, LocalComm
from sgtrain.config import Config, ConfigError
from sgtrain.data.builtin import BUILTIN_DATASETS, load_builtin
from sgtrain.generators import LoadedGenerator, load_generator
from sgtrain.metrics import stats
from sgtrain.sampling import generate, rank_indices, standing_statistics

METRICS = ("fid", "kid", "is", "pr", "classes")  # what can be asked for (pr: precision and recall)
# The figures a result holds, in the order they are logged (training logs them as eval/<name>)
RESULTS = ("fid", "kid", "is", "precision", "recall", "classes_covered")


def bundled_dataset(cfg: Config) -> str | None:
    """The bundled dataset a run trains on, or None for shards of other data."""
    if cfg.data.shards is None:
        return cfg.data.dataset
    return cfg.data.shards if cfg.data.shards in BUILTIN_DATASETS else None


def extractor_for(cfg: Config, kind: str = "auto", device: torch.device | str = "cpu", inception: str | None = None):
    """The feature extractor for a run: the digits classifier for bundled data, else Inception (``kind`` forces)."""
    dataset = bundled_dataset(cfg)
    if kind == "classifier" or (kind == "auto" and dataset is not None):
        if dataset is None:
            raise ConfigError("the classifier extractor exists for bundled datasets only (digits, mnist5k)")
        from sgtrain.metrics.classifier import classifier_extractor

        return classifier_extractor(dataset, cfg.model.resolution, device=device)
    if kind not in ("auto", "inception"):
        raise ConfigError(f"--extractor must be auto, inception or classifier, got {kind!r}")
    from sgtrain.metrics.features import inception_extractor

    return inception_extractor(inception, device=device)


@torch.no_grad()
def extract(extractor: Any, images: torch.Tensor, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Features (and logits) of ``images`` in batches, concatenated."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        for key, value in extractor(images[start : start + batch_size]).items():
            parts.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(value) for key, value in parts.items()}


def _cache_root() -> Path:
    return Path(os.environ.get("SGTRAIN_CACHE") or Path.home() / ".cache" / "sgtrain").expanduser() / "reference"


def _dataset_identity(cfg: Config) -> str:
    """What the real images are: a bundled dataset at a resolution, or the sha256 of the shards' manifest."""
    dataset = bundled_dataset(cfg)
    if dataset is not None:
        # "random": a seeded subset (reference_indices); references of the earlier first-N prefix are not reused.
        return f"{dataset}-{cfg.model.resolution}px-random"
    from sgtrain.data.stream import resolve_shards

    shards = resolve_shards(cfg.data.shards)  # type: ignore[arg-type] (not bundled: shards are set)
    manifest = Path(shards.urls[0]).parent / "manifest.json"
    if manifest.is_file():
        return "manifest-" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return "urls-" + hashlib.sha256("\n".join(shards.urls).encode()).hexdigest()[:16]


def reference_indices(num_images: int, num_samples: int) -> torch.Tensor:
    """Which images of a bundled dataset are the reference: ``num_samples`` of a permutation seeded with 0.

    Not the first ``num_samples``: the bundled files are ordered (mnist5k by class, so its first 1,000 images are
    only 0s and 1s; digits by writer), and a prefix is then not a sample of the distribution G is trained on."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(0))
    return order[:num_samples]


def real_images(cfg: Config, num_samples: int) -> torch.Tensor:
    """``num_samples`` real training images, the same ones every time: of a bundled dataset a seeded uniform subset
    (:func:`reference_indices`), of shards the first ones in shard order."""
    dataset = bundled_dataset(cfg)
    if dataset is not None:
        images = load_builtin(dataset, cfg.model.resolution).images
        return images[reference_indices(len(images), num_samples)]
    import numpy as np
    from PIL import Image

    from sgtrain.data.stream import read_shard, resolve_shards

    out = []
    for url in resolve_shards(cfg.data.shards).urls:  # type: ignore[arg-type]
        for _, image, _ in read_shard(url):
            if image is None:
                continue
            try:
                rgb = Image.open(io.BytesIO(image)).convert("RGB")
            except OSError:
                continue  # corrupt: the training stream skips it too
            out.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
            if len(out) == num_samples:
                return torch.stack(out).float().div_(127.5).sub_(1.0)
    return torch.stack(out).float().div_(127.5).sub_(1.0)


def reference_features(cfg: Config, extractor: Any, num_samples: int) -> dict[str, torch.Tensor]:
    """Features of the real images, computed once and cached under (dataset, extractor, protocol, samples)."""
    key = json.dumps([_dataset_identity(cfg), extractor.name, extractor.protocol, num_samples])
    path = _cache_root() / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return cached["features"]
    features = extract(extractor, real_images(cfg, num_samples))
    buffer = io.BytesIO()
    torch.save({"key": key, "features": features}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return features


def gather_rows(local: torch.Tensor, num_rows: int, comm: Comm) -> torch.Tensor:
    """Every rank's contiguous block of rows (``sampling.rank_indices``) assembled on every rank."""
    if comm.world_size == 1:
        return local
    full = torch.zeros((num_rows, *local.shape[1:]), dtype=local.dtype)
    indices = rank_indices(num_rows, comm.rank, comm.world_size)
    if indices:
        full[indices[0] : indices[-1] + 1] = local
    return comm.all_reduce(full, "sum")


def check_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")


def evaluate_run(
    run: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    num_samples: int = 10_000,
    truncation: float | None = None,
    extractor_kind: str = "auto",
    inception: str | None = None,
    seed: int = 0,
    comm: Comm | None = None,
    device: torch.device | str = "cpu",
    standing: bool = False,
) -> dict[str, Any]:
    """The metrics of a run's EMA generator (latest checkpoint) as plain data; every rank returns the same."""
    check_metrics(metrics)
    loaded = load_generator(run, device)
    if standing:
        standing_statistics(loaded, truncation=truncation, seed=seed)
    return evaluate_generator(
        loaded,
        metrics=metrics,
        num_samples=num_samples,
        truncation=truncation,
        extractor=extractor_for(loaded.cfg, extractor_kind, device, inception),
        seed=seed,
        comm=comm,
        device=device,
        run=run,
    )


def evaluate_generator(
    loaded: LoadedGenerator,
    *,
    metrics: Sequence[str],
    num_samples: int,
    truncation: float | None,
    extractor: Any,
    seed: int = 0,
    comm: Comm | None = None,
    device: torch.device | str = "cpu",
    run: str | Path = "",
) -> dict[str, Any]:
    """The metrics of a generator in memory (a loaded run, or the training loop's EMA); every rank the same."""
    cfg, m = loaded.cfg, loaded.cfg.model
    comm = comm or LocalComm()
    mine = rank_indices(num_samples, comm.rank, comm.world_size)
    images, _ = generate(
        loaded.module, mine, dim_z=m.dim_z, n_classes=m.n_classes, seed=seed, truncation=truncation, device=device
    )
    local = extract(extractor, images) if mine else {}
    fake: dict[str, torch.Tensor] = {}
    for key in ("features", "logits") if extractor.has_logits else ("features",):
        part = local.get(key, torch.zeros(0, extractor.dim if key == "features" else 1, dtype=torch.float64))
        fake[key] = gather_rows(part, num_samples, comm)
    real = reference_features(cfg, extractor, num_samples)
    result: dict[str, Any] = {
        "run": str(run),
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "generator": loaded.mode,
        "truncation": truncation,
        "num_samples": num_samples,
        "num_real": len(real["features"]),
        "extractor": extractor.name,
        "protocol": extractor.protocol,
    }
    f_real, f_fake = real["features"].double().numpy(), fake["features"].double().numpy()
    if "fid" in metrics:
        result["fid"] = stats.frechet_distance(*stats.feature_statistics(f_real), *stats.feature_statistics(f_fake))
    if "kid" in metrics:
        size = min(1000, len(f_real), len(f_fake))
        result["kid"], result["kid_std"] = stats.kernel_inception_distance(f_real, f_fake, subset_size=size, seed=seed)
    if "is" in metrics and extractor.has_logits:
        result["is"], result["is_std"] = stats.inception_score(fake["logits"].double().numpy())
    if "pr" in metrics:
        result["precision"], result["recall"] = stats.precision_recall(f_real, f_fake)
    if "classes" in metrics and extractor.has_logits:
        from sgtrain.metrics.classifier import classes_covered

        result["classes_covered"] = int(classes_covered(fake["logits"]))
    return result


def format_result(result: dict[str, Any]) -> str:
    """The metrics as a few readable lines, with what was measured and how."""
    lines = [
        f"{result['checkpoint']} (step {result['step']}): {result['num_samples']} samples vs {result['num_real']} real",
        f"  generator: EMA, {result['generator']}, truncation {result['truncation']}",
        f"  features: {result['extractor']} ({result['protocol']})",
    ]
    names = {"fid": "FID", "kid": "KID", "is": "IS", "precision": "precision", "recall": "recall"}
    for key, label in names.items():
        if key in result:
            spread = f" +- {result[key + '_std']:.4g}" if key + "_std" in result else ""
            lines.append(f"  {label:<10} {result[key]:.4f}{spread}")
    if "classes_covered" in result:
        lines.append(f"  classes    {result['classes_covered']} covered")
    return "\n".join(lines)
