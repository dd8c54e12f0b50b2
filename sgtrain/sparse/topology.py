"""Pure mask operations: initial masks, the drop-and-grow topology update, bit packing, checksums and seeds, and the
second moment a grown weight starts with in masked mode.

Every function here is a pure function of its arguments (tensors, integers, an explicitly seeded generator), so
every rank that calls it with the same inputs gets the same bits. Masks are ``torch.bool`` tensors of the weight's
shape. Selections break ties by the lower flat (row-major) index, through a stable sort over candidates listed in
index order: ``torch.topk`` gives no guarantee about which of equal values it returns, and a tie resolved
differently on two ranks would fork the model.

Drop and grow differ only by the score the caller hands in (RigL, Evci et al. 2020, Sec. 3):
|dense gradient| for RigL, |Adam exp_avg| for momentum growth, uniform random numbers for SET (Mocanu et al. 2018).
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence

import torch

_MASK63 = (1 << 63) - 1


def _check_count(count: int, numel: int) -> None:
    if not 0 <= count <= numel:
        raise ValueError(f"count must be in [0, {numel}], got {count}")


def select_top(candidates: torch.Tensor, values: torch.Tensor, k: int, *, largest: bool) -> torch.Tensor:
    """Flat indices of the ``k`` candidates with the largest (or smallest) value, ties to the lower flat index.

    ``candidates`` is a flat bool tensor, ``values`` a flat tensor of the same length; the result is a set (its
    order is unspecified). It equals the first ``k`` of a stable sort of the candidates in index order, without
    the sort: ``topk`` finds the k-th value, every candidate strictly beyond it is taken, and the remaining places
    go to the candidates equal to it in index order (``nonzero`` lists them that way). A full stable sort cost 6x
    more on the 21M-weight layers of BigGAN-128, and ``topk`` alone gives no guarantee about which ties it returns.
    """
    idx = candidates.nonzero().squeeze(1)
    if k <= 0:
        return idx[:0]
    if k >= idx.numel():
        return idx
    scores = values[idx]
    kth = torch.topk(scores, k, largest=largest, sorted=False).values
    threshold = kth.min() if largest else kth.max()
    beyond = (scores > threshold) if largest else (scores < threshold)
    n_beyond = int(beyond.sum())
    ties = (scores == threshold).nonzero().squeeze(1)[: k - n_beyond]
    return idx[torch.cat([beyond.nonzero().squeeze(1), ties])]


def random_mask(shape: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``count`` True entries, chosen uniformly at random.

    The mask is built on the generator's device (a CPU generator gives the same bits on every machine for the same
    seed); move it to the weight's device afterwards. Returns a ``torch.bool`` tensor of ``shape``.
    """
    numel = math.prod(shape)
    _check_count(count, numel)
    perm = torch.randperm(numel, generator=generator, device=generator.device)
    mask = torch.zeros(numel, dtype=torch.bool, device=generator.device)
    mask[perm[:count]] = True
    return mask.reshape(tuple(shape))


def random_scores(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) grow scores of ``shape`` (float32, on the generator's device): SET's random growth."""
    return torch.rand(tuple(shape), generator=generator, device=generator.device)


def magnitude_mask(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of ``weight.shape`` keeping the ``count`` entries of largest ``|weight|``, ties to the lower index."""
    _check_count(count, weight.numel())
    flat = weight.detach().reshape(-1).abs()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    mask[select_top(torch.ones_like(mask), flat, count, largest=True)] = True
    return mask.reshape(weight.shape)


def drop_fraction_k(active: int, fraction: float) -> int:
    """Number of weights to drop and grow: ``round(fraction * active)`` with Python's ``round`` (half to even).

    Rounding to nearest (rather than flooring) keeps float noise from losing a weight, e.g. ``0.29 * 100`` is
    ``28.999999999999996``; every rank computes the same float, so the result is the same everywhere.
    """
    if active < 0:
        raise ValueError(f"active must be >= 0, got {active}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return round(fraction * active)


def drop_and_grow(
    weight: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One topology update of one layer (RigL, Evci et al. 2020, Eq. 4 / Algorithm 1).

    Args:
        weight: the layer's weight, any shape ``S``; only ``|weight|`` of active entries is read.
        mask: ``torch.bool`` of shape ``S``, the current topology.
        score: grow score of shape ``S``, larger is better (|grad|, |exp_avg| or random); finite values expected.
        k: requested number of weights to swap; clamped to ``min(k, active, inactive)``.

    Drops the ``k`` active entries of smallest ``|weight|`` (RigL's ArgTopK(-|theta|)) and grows the ``k`` entries of
    largest ``score`` among those inactive BEFORE the update, so a weight dropped now is never regrown in the same
    update (RigL's TF code can regrow it; here drop and grow are disjoint, which keeps "grown weights start at zero"
    and "dropped weights are removed" unambiguous). Ties go to the lower flat index.

    Returns:
        ``(new_mask, dropped, grown)``, three ``torch.bool`` tensors of shape ``S``; ``dropped`` is a subset of
        ``mask``, ``grown`` of ``~mask``, both hold exactly the clamped ``k`` entries, and
        ``new_mask = mask & ~dropped | grown`` has exactly ``mask.sum()`` entries.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    if weight.shape != mask.shape or score.shape != mask.shape:
        raise ValueError(
            f"shapes differ: weight {tuple(weight.shape)}, mask {tuple(mask.shape)}, score {tuple(score.shape)}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")

    flat_mask = mask.reshape(-1)
    active = int(flat_mask.sum())
    # Clamp so the count is preserved exactly: we cannot drop more than is active nor grow more than is inactive.
    k = min(k, active, flat_mask.numel() - active)

    dropped = torch.zeros_like(flat_mask)
    grown = torch.zeros_like(flat_mask)
    if k > 0:
        magnitude = weight.detach().reshape(-1).abs()
        dropped[select_top(flat_mask, magnitude, k, largest=False)] = True
        grow_score = score.detach().reshape(-1).to(flat_mask.device)
        grown[select_top(~flat_mask, grow_score, k, largest=True)] = True
    new_mask = (flat_mask & ~dropped) | grown
    return new_mask.reshape(mask.shape), dropped.reshape(mask.shape), grown.reshape(mask.shape)


def _bit_shifts(device: torch.device) -> torch.Tensor:
    # Most significant bit first, the same layout as numpy.packbits, so packed masks can be read by other tools.
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask of any shape into a flat ``uint8`` tensor of length ``ceil(numel / 8)``.

    One bit per weight in row-major order, most significant bit first, the last byte zero-padded. This is what the
    owner rank broadcasts after a sharded update: 32x less than a float32 score tensor.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.reshape(-1, 8) << _bit_shifts(flat.device)
    # The eight shifted bits are distinct powers of two, so their sum is at most 255 and fits in uint8.
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a flat ``uint8`` tensor of length ``ceil(numel / 8)`` -> bool mask of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed must be a flat uint8 tensor of length {(numel + 7) // 8} for shape {tuple(shape)}, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(1) >> _bit_shifts(packed.device)) & 1
    return bits.reshape(-1)[:numel].reshape(tuple(shape)).bool()


def mask_checksum(mask: torch.Tensor) -> int:
    """A checksum of a bool mask, identical across processes, machines and runs, in ``[0, 2**63)`` (fits int64).

    SHA-256 over the shape and the packed bits, truncated to 63 bits so it can travel in an int64 tensor for the
    cross-rank comparison. Never Python's ``hash()``, which is salted per process.
    """
    header = ("bool:" + ",".join(str(d) for d in mask.shape) + ";").encode()
    digest = hashlib.sha256(header + pack_mask(mask).cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "big") & _MASK63


def layer_seed(seed: int, update_index: int, layer_index: int) -> int:
    """Seed for ``torch.Generator().manual_seed`` of one layer at one topology update, in ``[0, 2**63)``.

    A SHA-256 of the three integers: a pure function (same value in every process, unlike ``hash()``), and unlike a
    linear mix of primes it has no structured collisions between nearby triples.
    """
    parts = (operator.index(seed), operator.index(update_index), operator.index(layer_index))
    digest = hashlib.sha256(("sgtrain.layer_seed:" + ":".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") & _MASK63


def seed_second_moment(exp_avg_sq: torch.Tensor, *, grown: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``exp_avg_sq`` with its ``grown`` entries set to the mean of its ``kept`` entries (bool masks, all of the
    weight's shape): masked mode's second moment of a weight that just grew.

    A grown weight has had zero gradients, so its Adam second moment v is 0 while the step count t runs on; its
    first update is then ``lr * g / sqrt((1 - b2) g^2 / (1 - b2^t))``, about ``lr / sqrt(1 - b2)`` = 31.6 lr late in
    a run with b2 = 0.999, and v takes ~1/(1 - b2) steps to settle. The mean v of the layer's weights that stay
    active is a warm estimate of the layer's squared gradient, already in the bias of Adam's clock (no correction
    to apply), and needs no gradient, so it serves every growth mode and every engine alike. Measured on the
    CIFAR-10 G after a short warm-up with Adam's clock moved to step 60,000 (``python -m sgtrain bench --suite
    grown``), it gives grown weights the first-step distribution of the authors' dense mode. The alternative, the
    grown weight's own squared gradient at the update, gave steps ~0.7x too small under gradient growth: the weights
    it picks have unusually large gradients at that step, which regress at the next.
    """
    mean = exp_avg_sq[kept].mean() if bool(kept.any()) else exp_avg_sq.new_zeros(())
    return torch.where(grown, mean, exp_avg_sq)
