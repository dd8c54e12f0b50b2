"""A small class-conditional DCGAN/SNGAN-style pair for 32 px (or 64, 128), built through ``model.builder``.

``model.builder: sgtrain.examples.dcgan:build`` (configs/dcgan_digits.yaml) trains it sparse-to-sparse: the mask
manager masks every ``nn.Conv2d`` weight here (and the ``nn.Linear`` ones with ``sparse.targets: conv_linear``). G
upsamples by nearest-neighbour interpolation followed by a 3x3 conv, not by ``nn.ConvTranspose2d``, which is not an
``nn.Conv2d`` and so would stay dense.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from sgtrain.config import ModelConfig
from sgtrain.models.layers import CrossReplicaBatchNorm2d


def _init(module: nn.Module) -> None:
    # DCGAN's N(0, 0.02) weights and zero biases: small enough that the un-normalised D starts near zero logits.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """``G(z [B, dim_z], y [B] int64) -> images [B, 3, R, R]`` in [-1, 1]; ``ch`` sets the width (4ch at 4x4)."""

    def __init__(self, *, resolution: int, n_classes: int, dim_z: int, ch: int) -> None:
        super().__init__()
        n = int(math.log2(resolution)) - 2  # upsampling blocks from 4x4: 3 at 32 px
        widths = [ch * 2 ** (n - 1 - i) for i in range(n)]  # 32 px: 4ch, 2ch, ch
        self.embed = nn.Embedding(n_classes, dim_z)  # the class, concatenated to z
        self.stem = nn.Linear(2 * dim_z, 4 * 4 * widths[0])  # -> [B, 4ch, 4, 4]
        # Cross-replica BN is nn.BatchNorm2d in one process; under data parallelism the training loop makes its
        # statistics span the global batch, so N ranks train exactly as one process with the same global batch.
        self.stem_bn = CrossReplicaBatchNorm2d(widths[0])
        blocks = []
        for c_in, c_out in zip([widths[0], *widths[:-1]], widths, strict=True):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),  # then a Conv2d: both masked, unlike ConvTranspose2d
                nn.Conv2d(c_in, c_out, 3, padding=1),
                CrossReplicaBatchNorm2d(c_out),
                nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)
        self.widths = widths
        _init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([z, self.embed(y)], dim=1)).view(z.shape[0], self.widths[0], 4, 4)
        h = self.blocks(torch.relu(self.stem_bn(h)))  # [B, ch, R, R]
        return torch.tanh(self.to_rgb(h))


class Discriminator(nn.Module):
    """``D(x [B, 3, R, R], y [B] int64) -> logits [B]``; ``ch`` sets the width (ch at full resolution)."""

    def __init__(self, *, resolution: int, n_classes: int, ch: int) -> None:
        super().__init__()
        n = int(math.log2(resolution)) - 2  # stride-2 convs down to 4x4: 3 at 32 px
        widths = [ch * 2**i for i in range(n + 1)]  # 32 px: ch, 2ch, 4ch, 8ch
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in itertools.pairwise(widths):
            # A strided conv downsamples (no pooling layer), so the downsampling weights are learned and masked.
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], 1)
        # Projection conditioning (Miyato & Koyama 2018): the logit gains <embed(y), h>, so D judges "real and of
        # class y" with one embedding table instead of a class-specific head.
        self.embed = nn.Embedding(n_classes, widths[-1])
        _init(self)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Mean rather than SNGAN's sum pooling: without spectral norm, a sum would scale the logits with the area.
        h = self.features(x).mean(dim=(2, 3))  # [B, 8ch]
        return self.head(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def build(model: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The ``model.builder`` entry point: ``(Generator, Discriminator)`` for ``model`` (g_ch and d_ch: widths)."""
    generator = Generator(resolution=model.resolution, n_classes=model.n_classes, dim_z=model.dim_z, ch=model.g_ch)
    discriminator = Discriminator(resolution=model.resolution, n_classes=model.n_classes, ch=model.d_ch)
    return generator, discriminator
