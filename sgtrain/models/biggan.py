"""BigGAN generator and discriminator (Brock et al. 2019) for 32, 64 and 128 px.

Channel tables, block order, shortcut placement and init follow the reference BigGAN-PyTorch (``G_arch``,
``D_arch``), so parameter counts match the paper: at 128 px with ch=96, shared_dim=128, hier and attention
at 64, G has 70.43M and D 87.98M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgtrain.models.layers import (
    ConditionalBatchNorm2d,
    CrossReplicaBatchNorm2d,
    SelfAttention,
    SNConv2d,
    SNEmbedding,
    SNLinear,
)

BOTTOM_WIDTH = 4  # spatial side of G's first feature map
INITS = ("ortho", "N02", "xavier")

# Channel multipliers of ch per block, from BigGAN-PyTorch's G_arch: (in, out). Every G block upsamples 2x.
_G_ARCH: dict[int, tuple[list[int], list[int]]] = {
    32: ([4, 4, 4], [4, 4, 4]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
}
# D_arch: (in after the RGB input, out, downsample). The first block reads the 3 RGB channels.
_D_ARCH: dict[int, tuple[list[int], list[int], list[bool]]] = {
    32: ([4, 4, 4], [4, 4, 4, 4], [True, True, False, False]),
    64: ([1, 2, 4, 8], [1, 2, 4, 8, 16], [True, True, True, True, False]),
    128: ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True, True, True, True, True, False]),
}


def _check_resolution(resolution: int) -> None:
    if resolution not in _G_ARCH:
        raise ValueError(f"resolution must be one of {sorted(_G_ARCH)}, got {resolution}")


def _attention_blocks(attn_res: Sequence[int], block_res: list[int], net: str) -> set[int]:
    """Indices of the blocks followed by self-attention: the first block with each requested output side."""
    missing = sorted(set(attn_res) - set(block_res))
    if missing:
        # The reference silently skips such entries; a typo would then train a model without attention.
        raise ValueError(f"{net} has no block with output side {missing}; block outputs: {block_res}")
    return {block_res.index(r) for r in set(attn_res)}


def init_weights(module: nn.Module, init: str) -> None:
    """Re-initialise the ``weight`` of every Conv2d, Linear and Embedding in ``module``; biases keep torch's.

    ``ortho`` (orthogonal, BigGAN's default), ``N02`` (normal, std 0.02) or ``xavier`` (Glorot uniform).
    Modules are visited in ``module.modules()`` order, so the global RNG is consumed identically for the same
    architecture and seed.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding):
            if init == "ortho":
                nn.init.orthogonal_(m.weight)
            elif init == "N02":
                nn.init.normal_(m.weight, 0.0, 0.02)
            else:
                nn.init.xavier_uniform_(m.weight)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (buffers such as SN's ``u`` and BN statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


class GBlock(nn.Module):
    """Residual up-block: ccbn-ReLU-up-conv3x3-ccbn-ReLU-conv3x3, plus a 1x1 shortcut when shape changes.

    ``x``: ``[B, C_in, H, W]``, ``c``: class conditioning for the ccbns -> ``[B, C_out, 2H, 2W]``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        upsample: bool = True,
        cond_dim: int | None,
        n_classes: int | None,
        bn_eps: float,
        sn_eps: float,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv1 = SNConv2d(in_ch, out_ch, 3, padding=1, eps=sn_eps)
        self.conv2 = SNConv2d(out_ch, out_ch, 3, padding=1, eps=sn_eps)
        self.conv_sc = SNConv2d(in_ch, out_ch, 1, eps=sn_eps) if in_ch != out_ch or upsample else None
        bn_kwargs = dict(cond_dim=cond_dim, n_classes=n_classes, eps=bn_eps, sn_eps=sn_eps)
        self.bn1 = ConditionalBatchNorm2d(in_ch, **bn_kwargs)
        self.bn2 = ConditionalBatchNorm2d(out_ch, **bn_kwargs)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x, c))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.bn2(h, c)))
        if self.conv_sc is not None:
            x = self.conv_sc(x)
        return h + x


class DBlock(nn.Module):
    """Residual down-block: [ReLU]-conv3x3-ReLU-conv3x3-[avgpool2], plus a 1x1 shortcut when shape changes.

    "Wide" as in BigGAN: the hidden width is ``out_ch``.
    ``[B, C_in, H, W] -> [B, C_out, H/2, W/2]`` (``[B, C_out, H, W]`` without downsampling).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        preactivation: bool,
        downsample: bool,
        sn_eps: float,
    ) -> None:
        super().__init__()
        self.preactivation = preactivation
        self.downsample = downsample
        self.conv1 = SNConv2d(in_ch, out_ch, 3, padding=1, eps=sn_eps)
        self.conv2 = SNConv2d(out_ch, out_ch, 3, padding=1, eps=sn_eps)
        self.conv_sc = SNConv2d(in_ch, out_ch, 1, eps=sn_eps) if in_ch != out_ch or downsample else None

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Order as in the reference: the first block (3-channel RGB input) pools before its 1x1 conv, later
        # blocks convolve then pool. Both are linear, so the order changes cost, not the function.
        if self.preactivation:
            if self.conv_sc is not None:
                x = self.conv_sc(x)
            if self.downsample:
                x = F.avg_pool2d(x, 2)
        else:
            if self.downsample:
                x = F.avg_pool2d(x, 2)
            if self.conv_sc is not None:
                x = self.conv_sc(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No ReLU on the first block: it would clip the [-1, 1] image input.
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self._shortcut(x)


class Generator(nn.Module):
    """Class-conditional BigGAN generator: ``forward(z [B, dim_z], y LongTensor [B]) -> [B, 3, R, R]``.

    ``shared_dim > 0``: one shared class embedding feeds every ccbn through SNLinear gains and biases
    (BigGAN's ``G_shared``); ``shared_dim == 0``: each ccbn has its own per-class embedding tables.
    ``hier``: z is split into ``len(blocks) + 1`` equal chunks, the first feeding the input linear layer and
    one going to each block's ccbns (concatenated with the shared embedding); requires ``shared_dim > 0`` and
    ``dim_z`` divisible by the number of chunks.
    ``grey``: the output convolution draws one channel, repeated over R, G and B (greyscale data such as digits:
    D cannot then tell fakes by colour, which real grey images never have).
    """

    def __init__(
        self,
        *,
        resolution: int,
        n_classes: int,
        ch: int,
        dim_z: int,
        shared_dim: int,
        hier: bool,
        attn_res: Sequence[int],
        init: str,
        bn_eps: float = 1e-5,
        sn_eps: float = 1e-8,
        grey: bool = False,
    ) -> None:
        super().__init__()
        _check_resolution(resolution)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        in_mult, out_mult = _G_ARCH[resolution]
        in_ch, out_ch = [ch * m for m in in_mult], [ch * m for m in out_mult]
        block_res = [BOTTOM_WIDTH * 2 ** (i + 1) for i in range(len(out_ch))]
        attn_blocks = _attention_blocks(attn_res, block_res, "G")

        self.resolution, self.n_classes, self.dim_z = resolution, n_classes, dim_z
        self.shared_dim, self.hier, self.grey = shared_dim, hier, grey
        if hier:
            if shared_dim == 0:
                raise ValueError("hier=True needs a shared class embedding (shared_dim > 0)")
            num_chunks = len(out_ch) + 1
            if dim_z % num_chunks:
                raise ValueError(f"hier=True needs dim_z divisible by {num_chunks}, got {dim_z}")
            self.z_chunk = dim_z // num_chunks
        else:
            self.z_chunk = 0

        self.shared = nn.Embedding(n_classes, shared_dim) if shared_dim > 0 else None
        if shared_dim > 0:
            cond = {"cond_dim": shared_dim + self.z_chunk, "n_classes": None}
        else:
            cond = {"cond_dim": None, "n_classes": n_classes}
        self.linear = SNLinear(self.z_chunk if hier else dim_z, in_ch[0] * BOTTOM_WIDTH**2, eps=sn_eps)
        self.blocks = nn.ModuleList(
            GBlock(i, o, upsample=True, **cond, bn_eps=bn_eps, sn_eps=sn_eps)
            for i, o in zip(in_ch, out_ch, strict=True)
        )
        # Keyed by the index of the block the attention follows.
        attention = {str(i): SelfAttention(out_ch[i], sn_eps=sn_eps) for i in sorted(attn_blocks)}
        self.attention = nn.ModuleDict(attention)
        self.output_bn = CrossReplicaBatchNorm2d(out_ch[-1], eps=bn_eps, momentum=0.1)
        self.output_conv = SNConv2d(out_ch[-1], 1 if grey else 3, 3, padding=1, eps=sn_eps)
        init_weights(self, init)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``z``: ``[B, dim_z]``, ``y``: class indices ``LongTensor [B]`` -> images ``[B, 3, R, R]``."""
        if self.shared is None:
            conds = [y] * len(self.blocks)
        elif self.hier:
            zs = torch.split(z, self.z_chunk, dim=1)
            z, shared = zs[0], self.shared(y)
            conds = [torch.cat([shared, zi], dim=1) for zi in zs[1:]]
        else:
            conds = [self.shared(y)] * len(self.blocks)
        h = self.linear(z).view(z.shape[0], -1, BOTTOM_WIDTH, BOTTOM_WIDTH)
        for i, block in enumerate(self.blocks):
            h = block(h, conds[i])
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        out = torch.tanh(self.output_conv(F.relu(self.output_bn(h))))
        # Grey data: one channel drawn, repeated, so D, the metrics and the files see RGB images as before.
        return out.expand(-1, 3, -1, -1) if self.grey else out


class Discriminator(nn.Module):
    """BigGAN's projection discriminator (Miyato & Koyama 2018): ``forward(x [B, 3, R, R], y [B]) -> [B]``."""

    def __init__(
        self,
        *,
        resolution: int,
        n_classes: int,
        ch: int,
        attn_res: Sequence[int],
        init: str,
        sn_eps: float = 1e-8,
    ) -> None:
        super().__init__()
        _check_resolution(resolution)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        in_mult, out_mult, downsample = _D_ARCH[resolution]
        in_ch, out_ch = [3] + [ch * m for m in in_mult], [ch * m for m in out_mult]
        # Output side of each block. The reference's table lists [16] * 4 for 32 px, which is not the actual
        # side past the second block; the true sides are used here (they only decide where attention goes).
        block_res, side = [], resolution
        for down in downsample:
            side //= 2 if down else 1
            block_res.append(side)
        attn_blocks = _attention_blocks(attn_res, block_res, "D")

        self.resolution, self.n_classes = resolution, n_classes
        self.blocks = nn.ModuleList(
            DBlock(i, o, preactivation=k > 0, downsample=d, sn_eps=sn_eps)
            for k, (i, o, d) in enumerate(zip(in_ch, out_ch, downsample, strict=True))
        )
        attention = {str(i): SelfAttention(out_ch[i], sn_eps=sn_eps) for i in sorted(attn_blocks)}
        self.attention = nn.ModuleDict(attention)
        self.linear = SNLinear(out_ch[-1], 1, eps=sn_eps)
        self.embed = SNEmbedding(n_classes, out_ch[-1], eps=sn_eps)
        init_weights(self, init)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``: images ``[B, 3, R, R]``, ``y``: class indices ``LongTensor [B]`` -> logits ``[B]``."""
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        # Global sum pooling (not mean), as in SN-GAN and the reference.
        h = F.relu(h).sum(dim=(2, 3))  # [B, C]
        # Projection term <embed(y), h> makes D's output class-conditional without concatenating labels.
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
