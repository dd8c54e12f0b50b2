"""A small CNN trained on a bundled dataset (digits, mnist5k), as the feature extractor for 8x8 to 32x32 digits.

Inception features of a 8x8 digit upsampled to 299x299 say little; a classifier trained on the data itself gives a
Fréchet distance (penultimate features), an Inception-Score analogue and a classes-covered count (logits).

The classifier is a pure function of (dataset, resolution, architecture version, split seed): it is trained on the
training part of :func:`split_indices` with fixed seeds, deterministic kernels and one thread, so every machine
gets the same weights, and it is cached on disk (``$SGTRAIN_CACHE``, else ``~/.cache/sgtrain``) after the first use.
Evaluation against real data should use the held-out part, which the classifier has never seen.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sgtrain.checkpoint import write_atomic
from sgtrain.data.builtin import BUILTIN_DATASETS, load_builtin

ARCH_VERSION = "v1"  # bump when the architecture or the training recipe changes: it keys the cache file
FEATURE_DIM = 128
HELDOUT_FRACTION = 0.2
MIN_RESOLUTION, MAX_RESOLUTION = 8, 32

# Training recipe, counted in steps (not epochs) so that it does not depend on the dataset size.
TRAIN_STEPS = 600
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 1  # random translation by up to this many pixels (zero-padded), a cheap augmentation
TRAIN_SEED = 0


class DigitClassifier(nn.Module):
    """Grey ``[B, 1, R, R]`` in [-1, 1] -> (features ``[B, 128]``, logits ``[B, C]``), for R in 8..32.

    From 16 px up, a 2x space-to-depth (PixelUnshuffle: every pixel kept, as 4 channels) halves the map first, and
    the second conv has stride 2 while the map is larger than 8x8: torch's CPU kernels are slow for a thin
    full-resolution layer and for pooling, so this keeps 32 px training at ~13 ms a step on one thread. Three 3x3
    convs (32, 32, 64 channels), an average pool to 4x4 and a 128-d fully connected layer, the features.
    """

    def __init__(self, n_classes: int, resolution: int) -> None:
        super().__init__()
        unshuffle = 2 if resolution >= 16 and resolution % 2 == 0 else 1
        size = resolution // unshuffle
        stride = 2 if size > 8 else 1
        self.body = nn.Sequential(
            nn.PixelUnshuffle(unshuffle),
            nn.Conv2d(unshuffle**2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=stride, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(grey)
        return features, self.head(features)


def cache_root() -> Path:
    return Path(os.environ.get("SGTRAIN_CACHE") or Path.home() / ".cache" / "sgtrain").expanduser()


def cache_path(dataset: str, resolution: int, split_seed: int = 0) -> Path:
    return cache_root() / "classifiers" / f"{dataset}-{resolution}px-{ARCH_VERSION}-split{split_seed}.pt"


@functools.lru_cache(maxsize=8)
def _labels(name: str) -> torch.Tensor:
    return load_builtin(name, MIN_RESOLUTION).labels  # labels do not depend on the resolution


def split_indices(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) sorted int64 indices into ``load_builtin(name, R)``, stratified per class.

    Each class's indices are permuted with a generator seeded by ``seed`` and the first
    ``round(0.2 * count)`` are held out, so the held-out part has the class balance of the whole set.
    """
    labels = _labels(name)
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == c).flatten()
        perm = members[torch.randperm(len(members), generator=generator)]
        held.append(perm[: round(HELDOUT_FRACTION * len(members))])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def to_grey(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """RGB ``[B, 3, H, W]`` in [-1, 1] -> grey ``[B, 1, R, R]`` (channel mean; bilinear with antialiasing when
    ``H, W != R``)."""
    grey = images.to(torch.float32).mean(1, keepdim=True)
    if grey.shape[-2:] != (resolution, resolution):
        grey = F.interpolate(grey, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return grey


@contextlib.contextmanager
def _deterministic_single_thread() -> Iterator[None]:
    """One thread and deterministic kernels for the duration, restored afterwards (they are process-global)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _shift(grey: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-MAX_SHIFT, MAX_SHIFT]^2, filling with background (-1)."""
    size = grey.shape[-1]
    padded = F.pad(grey, [MAX_SHIFT] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(grey), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def train_classifier(
    dataset: str, resolution: int, split_seed: int = 0, steps: int = TRAIN_STEPS
) -> tuple[DigitClassifier, float]:
    """Train on the training split; returns the model (eval mode) and its held-out accuracy."""
    if dataset not in BUILTIN_DATASETS:
        raise ValueError(f"no classifier for {dataset!r}; bundled datasets: {', '.join(BUILTIN_DATASETS)}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"classifier resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")
    data = load_builtin(dataset, resolution)
    train_idx, held_idx = split_indices(dataset, split_seed)
    grey = to_grey(data.images, resolution)
    with _deterministic_single_thread():
        generator = torch.Generator().manual_seed(TRAIN_SEED)
        with torch.random.fork_rng(devices=[]):  # initialise from our seed without moving the caller's RNG
            torch.manual_seed(TRAIN_SEED)
            model = DigitClassifier(data.n_classes, resolution)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=max(steps, 2))
        model.train()
        perm, position = train_idx[torch.randperm(len(train_idx), generator=generator)], 0
        for _ in range(steps):
            if position + BATCH_SIZE > len(perm):
                perm, position = train_idx[torch.randperm(len(train_idx), generator=generator)], 0
            batch = perm[position : position + BATCH_SIZE]
            position += BATCH_SIZE
            _, logits = model(_shift(grey[batch], generator))
            loss = F.cross_entropy(logits, data.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            _, logits = model(grey[held_idx])
        accuracy = (logits.argmax(1) == data.labels[held_idx]).double().mean().item()
    return model, accuracy


def load_or_train(dataset: str, resolution: int, split_seed: int = 0) -> tuple[DigitClassifier, dict]:
    """The cached classifier for (dataset, resolution, ARCH_VERSION, split_seed), trained and cached if absent.

    Returns the model and its metadata: ``heldout_accuracy``, ``train_seconds``, ``n_classes`` and ``trained``
    (True when this call trained it, False when it was loaded).
    """
    path = cache_path(dataset, resolution, split_seed)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitClassifier(state["meta"]["n_classes"], resolution)
        model.load_state_dict(state["model"])
        return model.eval(), {**state["meta"], "trained": False}
    start = time.perf_counter()
    model, accuracy = train_classifier(dataset, resolution, split_seed)
    meta = {
        "dataset": dataset,
        "resolution": resolution,
        "arch_version": ARCH_VERSION,
        "split_seed": split_seed,
        "n_classes": model.head.out_features,
        "heldout_accuracy": accuracy,
        "train_seconds": time.perf_counter() - start,
    }
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "meta": meta}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())  # racing processes write identical bytes; the last rename wins
    return model, {**meta, "trained": True}


class ClassifierExtractor:
    """Penultimate features (128-d, after ReLU) and logits of the bundled-data classifier."""

    has_logits = True
    dim = FEATURE_DIM

    def __init__(
        self, model: DigitClassifier, dataset: str, resolution: int, meta: dict, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.resolution = resolution
        self.meta = meta
        self.n_classes = model.head.out_features
        self.name = f"{dataset}-classifier-{ARCH_VERSION}/{resolution}px"
        self.protocol = (
            f"[-1,1] RGB -> grey as the channel mean -> {resolution}x{resolution} (bilinear with antialiasing "
            f"only if the size differs) -> CNN trained on the {dataset} training split; features = penultimate "
            f"{FEATURE_DIM}-d after ReLU, logits over {self.n_classes} classes"
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> ``{"features": [B, 128], "logits": [B, C]}``, float64."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(images) == 0:
            empty = torch.empty(0, self.dim, dtype=torch.float64)
            return {"features": empty, "logits": torch.empty(0, self.n_classes, dtype=torch.float64)}
        features, logits = [], []
        for batch in images.split(batch_size):
            f, z = self.model(to_grey(batch.to(self.device), self.resolution))
            features.append(f.to(torch.float64).cpu())
            logits.append(z.to(torch.float64).cpu())
        return {"features": torch.cat(features), "logits": torch.cat(logits)}


def classifier_extractor(
    dataset: str, resolution: int, device: str | torch.device = "cpu", split_seed: int = 0
) -> ClassifierExtractor:
    """The feature extractor of the classifier for ``dataset`` at ``resolution`` px (trained on first use)."""
    model, meta = load_or_train(dataset, resolution, split_seed)
    return ClassifierExtractor(model, dataset, resolution, meta, device)


def classes_covered(logits: torch.Tensor, threshold: float = 0.2) -> int:
    """Number of classes that the argmax of ``logits [N, C]`` assigns to at least
    ``max(1, threshold * N / C)`` samples, i.e. to at least ``threshold`` of a uniform share.

    With the default 0.2 a class must take 2% of 10-class predictions: a classifier's scattered errors
    (a few percent spread over nine classes) do not count as coverage, a real but rare mode does.
    """
    n, c = logits.shape
    counts = torch.bincount(logits.argmax(1), minlength=c)
    return int((counts >= max(1.0, threshold * n / c)).sum())
