"""Sparse inference on CPU: run an eval-mode generator with sparse kernels where a layer is sparse enough to win.

:func:`compile_sparse` freezes spectral norm (``W / sigma`` computed once, exactly as the eval forward computes it)
and replaces every convolution and linear layer of a copy of the generator by a frozen module: dense (the same
``F.conv2d`` / ``F.linear`` as before) or sparse, chosen per layer by timing both on that layer's input shape at the
batch size the copy will serve.

The sparse convolution avoids im2col. A stride-1 ``k x k`` convolution is a sum over its ``k*k`` taps of a
``[C_out, C_in]`` matrix times a shifted copy of the input. In a channel-major, zero-padded layout
``xp [C_in, B * Hp * Wp]`` every shift is a plain column offset (``di * Wp + dj``), so::

    out[:, q] = sum over taps (di, dj) of  W[:, :, di, dj] @ xp[:, q + di * Wp + dj]

for every position ``q`` of the padded grid; the positions with ``row < H_out`` and ``col < W_out`` are the output,
the rest are discarded. Each tap is a CSR matrix and each product an MKL sparse-dense product (``torch.addmm`` with a
CSR left operand) reading a strided column window of ``xp``: no ``[C_in * k * k, B * H * W]`` unfold is ever built.
Columns are processed in chunks so that the window the nine taps read stays in cache.

``sgtrain.benchmarks.sparse_inference`` times the CIFAR-10 generator (``cifar10.yaml``) with random ERK masks, dense
against compiled.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgtrain.models.layers import SpectralNormMixin

MAX_DENSITY = 0.5  # denser layers stay dense untimed: CSR products run ~5-20x fewer FMA/s than MKL-DNN here
CHUNK = 4096  # columns per product: a whole padded image up to 62x62; C_in x CHUNK floats of input per window


@dataclass
class LayerChoice:
    """How one layer of a compiled generator runs, and why."""

    name: str  # qualified name in the generator, e.g. "blocks.0.conv1"
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # recorded on the calibration forward, at the compiled batch size
    density: float  # fraction of non-zero weights
    eligible: bool  # sparse kernel possible (stride 1, no groups or dilation) and density <= max_density
    choice: str  # "dense" or "sparse"
    dense_s: float | None = None  # median seconds per call measured on calibration (None: not timed)
    sparse_s: float | None = None


# --------------------------------------------------------------------------------------------------------------------
# Frozen layers.


class DenseConv2d(nn.Module):
    """A convolution with a fixed weight: ``[B, C_in, H, W] -> [B, C_out, H', W']``, exactly ``F.conv2d``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DenseLinear(nn.Module):
    """A linear layer with a fixed weight: ``[B, in] -> [B, out]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _csr32(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` as CSR with int32 indices: MKL's kernels take int32, and torch converts int64 ones on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = matrix.contiguous().to_sparse_csr()
        crow, col = csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32)
        return torch.sparse_csr_tensor(crow, col, csr.values(), csr.shape, check_invariants=False)


class SparseConv2d(nn.Module):
    """A stride-1 convolution as a sum of per-tap CSR products over a padded, channel-major copy of the input.

    ``weight`` ``[C_out, C_in, k, k]`` (zeros where masked), ``bias`` ``[C_out]`` or None.
    ``[B, C_in, H, W] -> [B, C_out, H + 2p - k + 1, W + 2p - k + 1]``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, *, chunk: int = CHUNK) -> None:
        super().__init__()
        c_out, _, kh, kw = weight.shape
        self.kernel, self.padding, self.chunk = (kh, kw), padding, chunk
        # One CSR matrix [C_out, C_in] per tap; taps without a single non-zero are skipped.
        self.taps = [
            (i, j, _csr32(weight[:, :, i, j])) for i in range(kh) for j in range(kw) if weight[:, :, i, j].any()
        ]
        self.register_buffer("bias", bias if bias is not None else weight.new_zeros(c_out))
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        (kh, kw), p = self.kernel, self.padding
        hp, wp = h + 2 * p, w + 2 * p
        grid = hp * wp
        reach = (kh - 1) * wp + (kw - 1)  # the furthest tap's column offset
        # Each image zero-padded and flattened, plus `reach` zero columns that the last positions' taps read past the
        # grid. Per image, so that the layout stays NCHW (no transposes) and a window's rows are ~grid floats apart.
        xp = x.new_zeros(b, c, grid + reach)
        xp[:, :, :grid].view(b, c, hp, wp)[:, :, p : p + h, p : p + w] = x
        # The bias is the products' initial value: addmm_ then accumulates every tap onto it in place.
        # repeat, not expand().contiguous(): the latter returns the bias itself when it has the output's shape.
        out = self.bias[None, :, None].repeat(b, 1, grid)
        for image, result in zip(xp, out, strict=True):
            # Column chunks keep the window the taps read (C_in x chunk floats) in cache.
            for start in range(0, grid, self.chunk):
                stop = min(grid, start + self.chunk)
                block = result[:, start:stop]
                for i, j, tap in self.taps:
                    offset = i * wp + j
                    block.addmm_(tap, image[:, start + offset : stop + offset])
        h_out, w_out = hp - kh + 1, wp - kw + 1
        return out.view(b, self.out_channels, hp, wp)[:, :, :h_out, :w_out]


class SparseLinear(nn.Module):
    """A linear layer as a CSR product: ``out^T [out, B] = W_csr [out, in] @ x^T [in, B]``. ``[B, in] -> [B, out]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_csr = _csr32(weight)
        self.register_buffer("bias", bias if bias is not None else weight.new_zeros(weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # repeat, not expand().contiguous(): at batch 1 that is the bias itself, and addmm_ would accumulate into it.
        out = self.bias[:, None].repeat(1, x.shape[0])
        return out.addmm_(self.weight_csr, x.t()).t()


# --------------------------------------------------------------------------------------------------------------------
# Compilation.


def _frozen_weight(module: nn.Module) -> torch.Tensor:
    """The weight the eval-mode forward uses: ``weight / sigma`` under spectral norm (one power iteration from the
    stored ``u``, not kept, as in :meth:`SpectralNormMixin.normalized_weight`), the raw weight otherwise."""
    with torch.no_grad():
        if isinstance(module, SpectralNormMixin):
            return module.normalized_weight().detach().clone()
        return module.weight.detach().clone()


def _sparse_eligible(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    conv = module
    assert isinstance(conv, nn.Conv2d)
    square_padding = isinstance(conv.padding, tuple) and len(set(conv.padding)) == 1
    return (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and square_padding
        and conv.padding_mode == "zeros"
    )


def interleaved_medians(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each function, timed round-robin so that drift in the machine's load hits all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def _record_input_shapes(G: nn.Module, names: Sequence[str], batch_size: int) -> dict[str, tuple[int, ...]]:
    """The input shape of each named layer on one forward of random latents at ``batch_size``."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(G.named_modules())

    def record(name: str) -> Callable[..., None]:
        # A pre-hook that returns a value replaces the layer's arguments: this one must return None.
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    try:
        z = torch.randn(batch_size, G.dim_z)
        y = torch.zeros(batch_size, dtype=torch.int64)
        with torch.no_grad():
            G(z, y)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def compile_sparse(
    G: nn.Module,
    *,
    batch_size: int,
    max_density: float = MAX_DENSITY,
    repeats: int = 5,
    force: str | None = None,
    chunk: int = CHUNK,
) -> nn.Module:
    """A frozen copy of the eval-mode generator ``G`` with each conv / linear layer run by the faster kernel.

    ``G`` must be in eval mode with its masked weights zero at inactive positions; it is not modified. Every
    ``nn.Conv2d`` / ``nn.Linear`` of the copy becomes a frozen layer holding ``weight / sigma``; those that the sparse
    kernel supports and whose density is at most ``max_density`` are timed (``repeats`` interleaved calls each, median)
    on random inputs of the shape they see at ``batch_size``, and run sparse if that is faster. ``force="sparse"``
    (or ``"dense"``) skips the timing and makes every eligible layer sparse (dense). The copy's ``sparse_plan`` lists a
    :class:`LayerChoice` per layer. Outputs equal ``G``'s up to float summation order (~1e-5).
    """
    if G.training:
        raise ValueError("compile_sparse needs an eval-mode generator (call G.eval() first)")
    if force not in (None, "sparse", "dense"):
        raise ValueError(f"force must be None, 'sparse' or 'dense', got {force!r}")
    compiled = copy.deepcopy(G).requires_grad_(False)
    layers = [(name, m) for name, m in compiled.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    input_shapes = _record_input_shapes(compiled, [name for name, _ in layers], batch_size)
    modules = dict(compiled.named_modules())
    plan: list[LayerChoice] = []
    for name, module in layers:
        if name not in input_shapes:
            continue  # not on the forward path (never called): left as it is
        weight = _frozen_weight(module)
        bias = None if module.bias is None else module.bias.detach().clone()
        is_conv = isinstance(module, nn.Conv2d)
        dense: nn.Module = DenseConv2d(weight, bias, module) if is_conv else DenseLinear(weight, bias)
        density = float(torch.count_nonzero(weight)) / weight.numel()
        eligible = _sparse_eligible(module) and density <= max_density
        choice = LayerChoice(
            name,
            "conv" if is_conv else "linear",
            tuple(weight.shape),
            input_shapes[name],
            density,
            eligible,
            "dense",
        )
        replacement = dense
        if eligible and force != "dense":
            sparse: nn.Module = (
                SparseConv2d(weight, bias, module.padding[0], chunk=chunk) if is_conv else SparseLinear(weight, bias)
            )
            if force == "sparse":
                choice.choice, replacement = "sparse", sparse
            else:
                x = torch.randn(input_shapes[name])
                with torch.no_grad():
                    choice.dense_s, choice.sparse_s = interleaved_medians(
                        [functools.partial(dense, x), functools.partial(sparse, x)], repeats
                    )
                if choice.sparse_s < choice.dense_s:
                    choice.choice, replacement = "sparse", sparse
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else compiled, attr, replacement)
        plan.append(choice)
    compiled.sparse_plan = plan
    return compiled
