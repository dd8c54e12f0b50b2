"""The format of `sgtrain export`: a run's EMA generator as one compact, data-only file (safetensors).

A sparse generator stored dense wastes most of its bytes on zeros. Here each masked weight tensor is stored as

* ``NAME:values``     its active weights in row-major (flat) order, in their own dtype (float32 stays float32, exact);
* ``NAME:rice_q``     the positions' Golomb-Rice quotients in unary (``q`` ones then a zero), bit-packed;
* ``NAME:rice_r``     their ``k``-bit remainders, bit-packed, most significant bit first;

where the coded numbers are the gaps between consecutive active flat indices minus one (the first counted from -1).
Two streams instead of one interleaved Rice code keep decoding vectorised: the quotients are the distances between
the zero bits of the unary stream (``np.flatnonzero``), the remainders a fixed-width reshape. Every other tensor of the
EMA state dict (biases, BN statistics and gains, embeddings, SN ``u``/``sv`` buffers, layers trained dense, and masked
layers whose code would not be smaller, i.e. density ~0.97 and up) is stored as is. The metadata holds the format
tag, the resolved config (to rebuild the Generator), the step, the source checkpoint's sha256 and per coded layer its
shape, nnz and ``k``.

Size. Active positions of a random mask at density p carry H(p)/p bits per non-zero (4.7 at p=0.1, 5.7 at 0.05);
Rice coding with the best ``k`` comes within ~2% of that (measured on a 256x256x3x3 layer: 2.00 / 2.96 / 3.69 / 4.76 /
5.78 bits at p = 0.5 / 0.3 / 0.2 / 0.1 / 0.05). The goal, values plus positions within 1.2 x density x the dense bytes
of a layer, leaves 0.2 x 32 = 6.4 bits per non-zero for the positions (float32 values): it is met down to p = 0.035
(6.30 bits) and missed below about p = 0.032, where H(p)/p itself exceeds 6.4 bits, so no position code can meet it
(8.1 bits at p = 0.01: values + positions are then 1.04 x the goal, still 1/80 of the dense layer).
"""

from __future__ import annotations

import numpy as np

FORMAT = "sgtrain-sparse-generator/1"
MAX_K = 16  # remainder bits tried per layer: enough for gaps of mean ~2**16, i.e. densities down to ~1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Golomb-Rice coding of sorted positions.


def rice_bits(indices: np.ndarray) -> np.ndarray:
    """Total coded bits ``[MAX_K + 1]`` of the sorted flat ``indices`` for each Rice parameter ``k = 0..MAX_K``."""
    gaps = np.diff(indices.astype(np.int64), prepend=-1) - 1
    ks = np.arange(MAX_K + 1)
    quotients = np.array([int((gaps >> k).sum()) for k in ks], dtype=np.int64)
    # Per position: q ones and a terminating zero in the unary stream, k remainder bits.
    return quotients + len(gaps) * (1 + ks)


def rice_encode(indices: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Sorted, distinct flat ``indices`` ``[nnz]`` -> ``(k, quotients, remainders)``, the two streams bit-packed
    ``uint8``; ``k`` minimises the total size."""
    indices = np.asarray(indices, dtype=np.int64)
    k = int(np.argmin(rice_bits(indices))) if len(indices) else 0
    gaps = np.diff(indices, prepend=-1) - 1
    q, r = gaps >> k, gaps & ((1 << k) - 1)
    unary = np.ones(int(q.sum()) + len(q), dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    fixed = ((r[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return k, np.packbits(unary), np.packbits(fixed)


def rice_decode(quotients: np.ndarray, remainders: np.ndarray, *, nnz: int, k: int, numel: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`: the sorted flat indices ``[nnz]`` (int64), each in ``[0, numel)``.

    Raises ``ValueError`` when the streams do not hold exactly ``nnz`` positions below ``numel``."""
    if not 0 <= k <= MAX_K or not 0 <= nnz <= numel:
        raise ValueError(f"k={k} or nnz={nnz} out of range for {numel} weights")
    if len(remainders) != (nnz * k + 7) // 8:
        raise ValueError(f"{len(remainders)} remainder bytes, expected {(nnz * k + 7) // 8}")
    unary = np.unpackbits(quotients)
    ends = np.flatnonzero(unary == 0)[:nnz]
    used = int(ends[-1]) + 1 if nnz else 0
    if len(ends) != nnz or len(quotients) != (used + 7) // 8 or unary[used:].any():
        raise ValueError(f"the quotient stream ({len(quotients)} bytes) does not hold exactly {nnz} codes")
    q = np.diff(ends, prepend=-1) - 1
    bits = np.unpackbits(remainders)[: nnz * k].reshape(nnz, k).astype(np.int64)
    r = bits @ (1 << np.arange(k - 1, -1, -1, dtype=np.int64))
    indices = np.cumsum((q << k) + r + 1) - 1
    if nnz and indices[-1] >= numel:
        raise ValueError(f"a coded position ({int(indices[-1])}) lies beyond the layer's {numel} weights")
    return indices
