"""Layer-wise densities for a global sparsity budget: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK).

ER and ERK come from RigL (Evci et al. 2020, "Rigging the Lottery", Sec. 3 and Appendix): a layer's density is
proportional to ``(sum(shape) / prod(shape)) ** power``, so small layers (few weights per unit of fan-in + fan-out)
stay denser than big ones, and the factor of proportionality is solved so the network holds exactly the requested
number of non-zeros. These are pure functions of shapes: no tensors, no state, identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

KINDS = ("uniform", "ER", "ERK")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _raw_score(shape: Sequence[int], kind: str, power: float) -> float:
    # ER (Mocanu et al. 2018, as used in RigL) only sees fan-in and fan-out: (n_in + n_out) / (n_in * n_out).
    # ERK adds the kernel dimensions: (n_in + n_out + w + h) / (n_in * n_out * w * h), so convolutions with large
    # kernels become sparser than a linear layer of the same fan-in / fan-out.
    dims = tuple(shape[:2]) if kind == "ER" else tuple(shape)
    return (sum(dims) / math.prod(dims)) ** power


def _check_shapes(shapes: Mapping[str, Sequence[int]]) -> None:
    if not shapes:
        raise ValueError("layer_densities needs at least one layer shape")
    for name, shape in shapes.items():
        if len(shape) == 0 or any(int(d) < 1 for d in shape):
            raise ValueError(f"layer {name!r} has shape {tuple(shape)}; every dimension must be >= 1 and ndim >= 1")


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    *,
    kind: str = "ERK",
    power: float = 1.0,
    dense: Collection[str] = (),
) -> dict[str, float]:
    """Per-layer density in (0, 1] for an overall ``density`` over the weight tensors named in ``shapes``.

    Args:
        shapes: layer name -> weight shape, e.g. ``(out, in, kh, kw)`` for a conv, ``(out, in)`` for a linear.
        density: overall fraction of non-zeros, in (0, 1].
        kind: ``"uniform"``, ``"ER"`` or ``"ERK"``.
        power: exponent applied to the ER/ERK score (RigL's ``erk_power_scale``); 0 makes ER/ERK uniform.
        dense: names kept fully dense (1.0).

    Budget convention. For ER/ERK the budget is ``density * sum(numel)`` over ALL layers in ``shapes``, the ``dense``
    ones included: their weights are paid out of the budget and the other layers get sparser to compensate; a
    ValueError is raised when the ``dense`` layers alone use up the whole budget.
    For ``uniform`` (as in RigL) the ``dense`` layers get 1.0 and every other layer keeps exactly ``density``: the
    others are NOT rescaled, so the network total then exceeds ``density * sum(numel)``.

    Returns:
        dict with the same keys (and order) as ``shapes``; layers that are dense hold exactly 1.0.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown density distribution {kind!r}; valid: {', '.join(KINDS)}")
    if not 0.0 < density <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")
    _check_shapes(shapes)
    unknown = sorted(set(dense) - set(shapes))
    if unknown:
        raise ValueError(f"dense layers {unknown} are not among the given shapes")

    if density == 1.0:
        return dict.fromkeys(shapes, 1.0)
    if kind == "uniform":
        return {name: 1.0 if name in dense else float(density) for name in shapes}

    numel = {name: _numel(shape) for name, shape in shapes.items()}
    score = {name: _raw_score(shape, kind, power) for name, shape in shapes.items()}
    budget = density * sum(numel.values())

    # Derivation (RigL's ERK). Let D be the set of dense layers and S the sparse rest. We want
    #     sum_{l in D} n_l  +  sum_{l in S} eps * s_l * n_l  =  density * N,        N = sum_l n_l,
    # with s_l the raw score and n_l the number of weights, hence
    #     eps = (density * N - sum_{l in D} n_l) / sum_{l in S} s_l * n_l.
    # A density eps * s_l > 1 is impossible, so such layers move to D and eps is solved again. Moving a layer j with
    # eps * s_j > 1 to D frees eps * s_j * n_j - n_j > 0 weights for the rest, so eps only grows from one iteration
    # to the next: a layer over 1 stays over 1, and moving all of them at once reaches the same fixed point as RigL's
    # one-at-a-time loop. The loop ends after at most len(shapes) rounds.
    is_dense = {name: name in dense for name in shapes}
    while True:
        dense_numel = sum(numel[n] for n in shapes if is_dense[n])
        sparse = [n for n in shapes if not is_dense[n]]
        if not sparse:
            # Only reachable when rounding makes the last layers tip over 1 at a density of ~1.
            break
        remaining = budget - dense_numel
        if remaining <= 0:
            forced = [n for n in shapes if is_dense[n]]
            raise ValueError(
                f"overall density {density} allows {budget:.0f} weights but the dense layers {forced} alone hold "
                f"{dense_numel}; raise the density or keep fewer layers dense"
            )
        eps = remaining / sum(score[n] * numel[n] for n in sparse)
        over = [n for n in sparse if eps * score[n] > 1.0]
        if not over:
            break
        for n in over:
            is_dense[n] = True

    return {n: 1.0 if is_dense[n] else eps * score[n] for n in shapes}


def active_counts(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]) -> dict[str, int]:
    """Number of active weights per layer: ``round(density_l * numel_l)``, clamped to ``[1, numel_l]``.

    ``round`` is Python's (half to even), the same on every rank. Rounding each layer to the nearest integer keeps the
    network total within one weight per layer of ``sum_l density_l * numel_l``. A layer never gets 0 active weights:
    it would cut the signal through the network (and make its density-based updates degenerate).
    """
    counts = {}
    for name, shape in shapes.items():
        n = _numel(shape)
        counts[name] = min(n, max(1, round(densities[name] * n)))
    return counts
