"""Building blocks of BigGAN (Brock et al. 2019): spectral norm, class-conditional BN, self-attention.

Spectral norm is our own rather than ``torch.nn.utils.parametrizations.spectral_norm`` so that the raw
tensor stays an ordinary parameter named ``weight``: the sparse-mask manager masks exactly ``module.weight``
and spectral norm then normalises the masked tensor (docs/design.md, "The sparse core").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SpectralNormMixin:
    """Spectral normalisation (Miyato et al. 2018) with one power iteration per training forward.

    The weight is viewed as a matrix ``W`` of shape ``[out, rest]`` (``out = weight.shape[0]``); the buffer
    ``u`` ``[1, out]`` is the running estimate of its top left singular vector and ``sv`` ``[1]`` the last
    sigma, kept for logging.
    """

    weight: nn.Parameter
    u: torch.Tensor
    sv: torch.Tensor
    training: bool

    def _init_spectral_norm(self, num_outputs: int, eps: float) -> None:
        self.sn_eps = eps
        u = torch.randn(1, num_outputs)
        self.register_buffer("u", u / u.norm().clamp_min(eps))
        self.register_buffer("sv", torch.ones(1))

    def normalized_weight(self) -> torch.Tensor:
        """``weight / sigma``, shape and dtype of ``weight``; updates ``u`` and ``sv`` in training mode."""
        # The power iteration and sigma run in float32 even under autocast: bf16 keeps 8 mantissa bits, so u
        # would drift and sigma (the Lipschitz constant SN pins at 1) would be off by up to ~0.4%.
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            w = self.weight.reshape(self.weight.shape[0], -1).float()
            with torch.no_grad():
                # One step from the stored u, as BigGAN does in both modes; only training mode keeps the
                # result, so eval forwards are deterministic and leave the module's state untouched.
                v = F.normalize(self.u.float() @ w, dim=1, eps=self.sn_eps)
                u = F.normalize(v @ w.t(), dim=1, eps=self.sn_eps)
                if self.training:
                    self.u.copy_(u)
            # Gradient flows through sigma with u, v held fixed (Miyato et al., eq. 12). u and v are fresh
            # tensors, not the buffer, so a second forward before backward (D on fakes, then reals) cannot
            # invalidate the graph.
            sigma = (u @ w @ v.t()).squeeze()
            if self.training:
                with torch.no_grad():
                    self.sv.copy_(sigma.detach())
            # A fully masked (all-zero) weight has sigma 0; clamp so it gives zeros instead of NaN.
            sigma = sigma.clamp_min(self.sn_eps)
        return self.weight / sigma


class SNConv2d(SpectralNormMixin, nn.Conv2d):
    """``nn.Conv2d`` with spectral norm on ``weight``. ``[B, C_in, H, W] -> [B, C_out, H', W']``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_spectral_norm(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class SNLinear(SpectralNormMixin, nn.Linear):
    """``nn.Linear`` with spectral norm on ``weight``. ``[B, in] -> [B, out]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, eps: float = 1e-8) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_spectral_norm(out_features, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SNEmbedding(SpectralNormMixin, nn.Embedding):
    """``nn.Embedding`` with spectral norm on its ``[num_embeddings, dim]`` table. ``[B] -> [B, dim]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, eps: float = 1e-8) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self._init_spectral_norm(num_embeddings, eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.embedding(y, self.normalized_weight())


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics can span every rank (BigGAN's cross-replica BN).

    The training loop sets ``sum_over_replicas`` (a differentiable sum over ranks) when several ranks train; then
    the mean and variance are those of the global batch, and a run on N ranks matches one process with the same
    global batch. Unset, in eval mode, or in one process, this is exactly ``nn.BatchNorm2d`` (same state dict).
    ``x``: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.momentum is None or not self.track_running_stats:
            raise ValueError("CrossReplicaBatchNorm2d keeps running statistics with a fixed momentum")
        self.sum_over_replicas: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sum_over_replicas"] = None  # a deep copy (the EMA) must not carry the process group along
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.sum_over_replicas
        if total is None or not self.training:
            return super().forward(x)
        # Two passes (mean, then centred squares) rather than E[x^2] - E[x]^2, which cancels catastrophically; in
        # fp32 even under autocast, as autocast runs batch norm.
        x = x.float()
        local = torch.cat([x.sum(dim=(0, 2, 3)), x.new_tensor([x.numel() / x.shape[1]])])
        summed = total(local)
        n = summed[-1]
        mean = summed[:-1] / n
        centered = x - mean[None, :, None, None]
        var = total((centered * centered).sum(dim=(0, 2, 3))) / n  # biased, as BN normalises with
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)  # unbiased, as nn.BatchNorm2d keeps
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


class ConditionalBatchNorm2d(nn.Module):
    """BigGAN's class-conditional BN: ``BN(x) * (1 + gain(c)) + bias(c)`` with per-sample gains and biases.

    Give exactly one of ``cond_dim`` (``c`` is a float vector ``[B, cond_dim]``, e.g. the shared class
    embedding concatenated with a z chunk; gain and bias are bias-free ``SNLinear``) or ``n_classes``
    (``c`` is a class index ``LongTensor [B]``; gain and bias are ``nn.Embedding`` tables). As in the
    reference, the gain is parametrised as ``1 + gain(c)`` and the tables get the model-wide init, so the
    effective gain starts near 1.
    ``x``: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    sparse_exempt = True  # gain and bias are linear layers but produce norm gains: sgtrain.sparse keeps them dense

    def __init__(
        self,
        num_features: int,
        *,
        cond_dim: int | None = None,
        n_classes: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        sn_eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if (cond_dim is None) == (n_classes is None):
            raise ValueError("ConditionalBatchNorm2d needs exactly one of cond_dim and n_classes")
        self.bn = CrossReplicaBatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gain: nn.Module
        self.bias: nn.Module
        if cond_dim is not None:
            self.gain = SNLinear(cond_dim, num_features, bias=False, eps=sn_eps)
            self.bias = SNLinear(cond_dim, num_features, bias=False, eps=sn_eps)
        else:
            self.gain = nn.Embedding(n_classes, num_features)
            self.bias = nn.Embedding(n_classes, num_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(c)[:, :, None, None]
        bias = self.bias(c)[:, :, None, None]
        return self.bn(x) * gain + bias


class SelfAttention(nn.Module):
    """SAGAN non-local block as used in BigGAN. ``[B, C, H, W] -> [B, C, H, W]`` (H and W even).

    Keys and values are max-pooled 2x2, cutting the attention matrix to ``[HW, HW/4]``. ``gamma`` starts at 0,
    so the block is the identity at init and the network learns how much non-local evidence to mix in.
    """

    def __init__(self, ch: int, *, sn_eps: float = 1e-8) -> None:
        super().__init__()
        if ch < 8:
            raise ValueError(f"SelfAttention needs at least 8 channels, got {ch}")
        self.ch = ch
        self.theta = SNConv2d(ch, ch // 8, kernel_size=1, bias=False, eps=sn_eps)
        self.phi = SNConv2d(ch, ch // 8, kernel_size=1, bias=False, eps=sn_eps)
        self.g = SNConv2d(ch, ch // 2, kernel_size=1, bias=False, eps=sn_eps)
        self.o = SNConv2d(ch // 2, ch, kernel_size=1, bias=False, eps=sn_eps)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [B, C/8, HW]
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # [B, C/8, HW/4]
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # [B, C/2, HW/4]
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # [B, HW, HW/4]
        o = torch.bmm(g, beta.transpose(1, 2)).view(b, self.ch // 2, h, w)
        return x + self.gamma * self.o(o)
