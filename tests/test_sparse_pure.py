"""Pure sparse functions: layer densities, mask operations, bit packing, seeds and schedules (exact, CPU, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.schedule import UpdateSchedule, gmp_density
from sgtrain.sparse.topology import (
    drop_and_grow,
    drop_fraction_k,
    layer_seed,
    magnitude_mask,
    mask_checksum,
    pack_mask,
    random_mask,
    random_scores,
    unpack_mask,
)

# A BigGAN-like mix: 3x3 convs, a 1x1 conv, linears, an embedding-like matrix, tiny heads and one big layer.
NETWORK = {
    "conv3x3": (64, 32, 3, 3),
    "conv1x1": (32, 64, 1, 1),
    "big_conv": (256, 256, 3, 3),
    "linear": (128, 64),
    "embed_like": (1000, 16),
    "tiny_head": (1, 256),
    "tiny_conv": (3, 8, 3, 3),
}

# Two layers whose densities are computable by hand (see the ERK/ER tests).
LIN = (16, 16)  # numel 256; ER and ERK score (16 + 16) / 256 = 1/8
CONV = (8, 4, 3, 3)  # numel 288; ERK score 18 / 288 = 1/16; ER score 12 / 32 = 3/8


def numel(shape) -> int:
    return math.prod(shape)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# Layer densities.


def test_erk_hand_computed():
    # budget 0.5 * 544 = 272 = eps * (256/8 + 288/16) = 50 eps  ->  eps = 5.44.
    d = layer_densities({"lin": LIN, "conv": CONV}, 0.5, kind="ERK")
    assert d == pytest.approx({"lin": 0.68, "conv": 0.34}, abs=1e-12)
    assert active_counts({"lin": LIN, "conv": CONV}, d) == {"lin": 174, "conv": 98}


def test_er_hand_computed_and_differs_from_erk_on_convs():
    # ER ignores the kernel: conv score 3/8. 272 = eps * (32 + 108) -> eps = 68/35; lin 17/70, conv 51/70.
    shapes = {"lin": LIN, "conv": CONV}
    er = layer_densities(shapes, 0.5, kind="ER")
    assert er == pytest.approx({"lin": 17 / 70, "conv": 51 / 70}, abs=1e-12)
    assert er["conv"] != pytest.approx(layer_densities(shapes, 0.5, kind="ERK")["conv"])


def test_er_equals_erk_on_linear_layers():
    shapes = {"a": (128, 64), "b": (10, 128), "c": (1000, 16), "d": (64, 1)}
    er = layer_densities(shapes, 0.2, kind="ER")
    erk = layer_densities(shapes, 0.2, kind="ERK")
    assert er == pytest.approx(erk, rel=1e-12)
    assert len(set(round(v, 9) for v in erk.values())) == 4  # not trivially uniform


def test_uniform_and_dense_layers_not_rescaled():
    d = layer_densities(NETWORK, 0.3, kind="uniform")
    assert d == dict.fromkeys(NETWORK, 0.3)
    d = layer_densities(NETWORK, 0.3, kind="uniform", dense=["tiny_head"])
    assert d == {**dict.fromkeys(NETWORK, 0.3), "tiny_head": 1.0}


def test_power_zero_is_uniform():
    d = layer_densities({"lin": LIN, "conv": CONV}, 0.5, kind="ERK", power=0.0)
    assert d == pytest.approx({"lin": 0.5, "conv": 0.5}, abs=1e-12)


def test_power_scales_the_score():
    # power 2: scores 1/64 and 1/256, budget 272 = eps * (4 + 1.125) -> eps = 272 / 5.125.
    d = layer_densities({"lin": LIN, "conv": CONV}, 0.5, kind="ERK", power=2.0)
    eps = 272 / 5.125
    assert d == pytest.approx({"lin": eps / 64, "conv": eps / 256}, abs=1e-12)


def test_layer_over_one_made_dense_and_eps_resolved():
    # head (2, 1): score 3/2. First pass eps = 273 / 53 -> head 7.7 > 1. Re-solved: eps = (273 - 2) / 50 = 5.42.
    shapes = {"lin": LIN, "conv": CONV, "head": (2, 1)}
    d = layer_densities(shapes, 0.5, kind="ERK")
    assert d == pytest.approx({"lin": 0.6775, "conv": 0.33875, "head": 1.0}, abs=1e-12)
    assert d["head"] == 1.0
    counts = active_counts(shapes, d)
    assert counts == {"lin": 173, "conv": 98, "head": 2}
    assert sum(counts.values()) == 273


def test_second_round_makes_another_layer_dense():
    # density 0.103: budget 425.802 over numels 2 + 36 + 4096; ERK scores 3/2, 1/3, 1/32.
    shapes = {"head": (2, 1), "mid": (6, 6), "big": (64, 64)}
    budget = 0.103 * 4134
    first_eps = budget / (3 + 12 + 128)
    assert first_eps * 1.5 > 1 and first_eps / 3 < 1  # mid fits in the first round ...
    assert (budget - 2) / (12 + 128) / 3 > 1  # ... and tips over 1 once head is dense
    d = layer_densities(shapes, 0.103, kind="ERK")
    assert d == pytest.approx({"head": 1.0, "mid": 1.0, "big": (budget - 38) / 4096}, abs=1e-12)


def test_dense_layers_paid_from_budget():
    # lin dense takes 256 of the 272 budget: conv gets 16 / 288.
    d = layer_densities({"lin": LIN, "conv": CONV}, 0.5, kind="ERK", dense=["lin"])
    assert d == pytest.approx({"lin": 1.0, "conv": 16 / 288}, abs=1e-12)
    assert d["lin"] == 1.0


def test_dense_layers_over_budget_raise():
    with pytest.raises(ValueError, match="dense layers"):
        layer_densities({"lin": LIN, "conv": CONV}, 0.5, kind="ERK", dense=["conv"])
    with pytest.raises(ValueError, match="not among"):
        layer_densities({"lin": LIN}, 0.5, dense=["nope"])


@pytest.mark.parametrize("kind", ["ER", "ERK"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 0.95])
def test_network_total_within_one_weight_per_layer(kind, density):
    d = layer_densities(NETWORK, density, kind=kind)
    counts = active_counts(NETWORK, d)
    total = sum(numel(s) for s in NETWORK.values())
    assert abs(sum(counts.values()) - density * total) <= len(NETWORK)
    # The density solution itself meets the budget (up to float), and is a valid fixed point of the procedure:
    # sparse layers share one eps, dense layers would have exceeded 1 under it.
    assert sum(d[n] * numel(s) for n, s in NETWORK.items()) == pytest.approx(density * total, rel=1e-12)
    scores = {n: (sum(s[:2]) / numel(s[:2]) if kind == "ER" else sum(s) / numel(s)) for n, s in NETWORK.items()}
    sparse = [n for n in NETWORK if d[n] < 1.0]
    assert sparse
    eps = d[sparse[0]] / scores[sparse[0]]
    for n in NETWORK:
        assert 0 < d[n] <= 1.0
        assert 1 <= counts[n] <= numel(NETWORK[n])
        if d[n] < 1.0:
            assert d[n] == pytest.approx(eps * scores[n], rel=1e-12)
        else:
            assert eps * scores[n] >= 1.0 - 1e-12


def test_erk_makes_small_layers_denser():
    d = layer_densities(NETWORK, 0.1, kind="ERK")
    assert d["tiny_conv"] > d["conv3x3"] > d["big_conv"]
    assert d["tiny_head"] == 1.0  # (1 + 256) / 256 > 1 for any eps >= 1


@pytest.mark.parametrize("kind", ["uniform", "ER", "ERK"])
def test_density_one_all_dense(kind):
    d = layer_densities(NETWORK, 1.0, kind=kind)
    assert d == dict.fromkeys(NETWORK, 1.0)
    assert active_counts(NETWORK, d) == {n: numel(s) for n, s in NETWORK.items()}


def test_active_counts_at_least_one():
    shapes = {"huge": (1000, 1000), "small": (4, 4)}
    assert active_counts(shapes, {"huge": 0.5, "small": 0.01}) == {"huge": 500000, "small": 1}


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_raises(density):
    with pytest.raises(ValueError, match="density"):
        layer_densities(NETWORK, density)


def test_bad_kind_raises_and_names_valid():
    with pytest.raises(ValueError, match="uniform, ER, ERK"):
        layer_densities(NETWORK, 0.5, kind="erk")


# --------------------------------------------------------------------------------------------------------------------
# Masks.


@pytest.mark.parametrize("shape", [*NETWORK.values(), (7,), (1, 1)])
def test_random_mask_exact_count_and_deterministic(shape):
    n = numel(shape)
    for count in (0, 1, n // 3, n):
        m = random_mask(shape, count, gen(5))
        assert m.dtype == torch.bool and m.shape == shape
        assert int(m.sum()) == count
        assert torch.equal(m, random_mask(shape, count, gen(5)))
    if n >= 16:
        assert not torch.equal(random_mask(shape, n // 2, gen(5)), random_mask(shape, n // 2, gen(6)))
    with pytest.raises(ValueError):
        random_mask(shape, n + 1, gen(0))


def test_magnitude_mask_ties_to_lower_index():
    w = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, -2.0])
    assert magnitude_mask(w, 2).tolist() == [False, True, True, False, False, False]
    assert magnitude_mask(w, 4).tolist() == [False, True, True, True, True, False]
    w2 = torch.ones(3, 4)
    assert magnitude_mask(w2, 5).reshape(-1).tolist() == [True] * 5 + [False] * 7


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (50, 20), (5, 7, 1, 1)])
def test_magnitude_mask_against_reference(shape):
    # Quantised weights give many ties; compare with a sort on (-|w|, index) in plain Python.
    w = torch.randint(-4, 5, shape, generator=gen(1)).float()
    count = numel(shape) // 3
    ref = sorted(range(numel(shape)), key=lambda i: (-abs(w.reshape(-1)[i].item()), i))[:count]
    expected = torch.zeros(numel(shape), dtype=torch.bool)
    expected[ref] = True
    assert torch.equal(magnitude_mask(w, count), expected.reshape(shape))


def reference_drop_and_grow(weight, mask, score, k):
    """Plain-Python drop and grow: sort (key, index) lists."""
    w, m, s = weight.reshape(-1).tolist(), mask.reshape(-1).tolist(), score.reshape(-1).tolist()
    active = [i for i in range(len(m)) if m[i]]
    inactive = [i for i in range(len(m)) if not m[i]]
    k = min(k, len(active), len(inactive))
    drop = sorted(active, key=lambda i: (abs(w[i]), i))[:k]
    grow = sorted(inactive, key=lambda i: (-s[i], i))[:k]
    new = list(m)
    for i in drop:
        new[i] = False
    for i in grow:
        new[i] = True
    return new, sorted(drop), sorted(grow)


def test_drop_and_grow_hand_example():
    w = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0, 0.2, 0.0])
    m = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    s = torch.tensor([9.0, 9.0, 0.1, 0.0, 0.7, 0.3, 9.0, 0.7])  # high scores on active entries must be ignored
    new, dropped, grown = drop_and_grow(w, m, s, 2)
    assert dropped.nonzero().squeeze(1).tolist() == [1, 6]
    assert grown.nonzero().squeeze(1).tolist() == [4, 7]
    assert new.tolist() == [True, False, False, True, True, False, False, True]


def test_drop_and_grow_ties_by_index():
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    m = w != 0
    s = torch.zeros(2, 3)
    _, dropped, grown = drop_and_grow(w, m, s, 2)
    assert dropped.reshape(-1).nonzero().squeeze(1).tolist() == [0, 1]
    assert grown.reshape(-1).nonzero().squeeze(1).tolist() == [2, 4]


def test_drop_and_grow_never_regrows_just_dropped():
    # The dropped weight has the best score but was active before the update: it must not come back.
    w = torch.tensor([0.1, 0.9, 0.0, 0.0])
    m = torch.tensor([True, True, False, False])
    s = torch.tensor([100.0, 0.0, 1.0, 2.0])
    new, dropped, grown = drop_and_grow(w, m, s, 1)
    assert dropped.tolist() == [True, False, False, False]
    assert grown.tolist() == [False, False, False, True]
    assert new.tolist() == [False, True, False, True]


@pytest.mark.parametrize("score_kind", ["gradient", "momentum", "random"])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (64, 32), (200, 4), (8, 16, 1, 1), (3, 5)])
def test_drop_and_grow_repeated_updates(score_kind, shape):
    g = gen(123)
    n = numel(shape)
    count = max(1, n // 5)
    mask = random_mask(shape, count, g)
    weight = torch.randn(shape, generator=g) * mask
    momentum = torch.zeros(shape)
    ever = mask.clone()
    for update in range(50):
        grad = torch.randn(shape, generator=g)
        momentum = 0.9 * momentum + 0.1 * grad
        if score_kind == "gradient":
            score = grad.abs()
        elif score_kind == "momentum":
            score = momentum.abs()
        else:
            score = random_scores(shape, gen(layer_seed(7, update, 0)))
        k = drop_fraction_k(count, 0.3)
        new, dropped, grown = drop_and_grow(weight, mask, score, k)
        if update < 5:  # the full reference is slow in Python; a few updates cover it
            ref_new, ref_drop, ref_grow = reference_drop_and_grow(weight, mask, score, k)
            assert new.reshape(-1).tolist() == ref_new
            assert dropped.reshape(-1).nonzero().squeeze(1).tolist() == ref_drop
            assert grown.reshape(-1).nonzero().squeeze(1).tolist() == ref_grow
        expected_k = min(k, count, n - count)
        assert int(new.sum()) == count
        assert int(dropped.sum()) == int(grown.sum()) == expected_k
        assert not (grown & mask).any()  # grown were inactive before
        assert torch.equal(dropped & mask, dropped)  # dropped were active before
        assert not (grown & dropped).any()
        assert torch.equal(new, (mask & ~dropped) | grown)
        # Train a little: grown weights start at zero, the rest drift.
        weight = torch.where(grown, torch.zeros_like(weight), weight + 0.1 * torch.randn(shape, generator=g)) * new
        mask = new
        ever |= mask
    if n - count > 0:
        assert int(ever.sum()) > count  # the topology did explore


@pytest.mark.parametrize(
    ("active", "numel_", "k", "expected"),
    [(9, 10, 5, 1), (1, 10, 5, 1), (10, 10, 5, 0), (0, 10, 5, 0), (5, 10, 0, 0), (5, 10, 5, 5), (5, 10, 6, 5)],
)
def test_drop_and_grow_clamps_k(active, numel_, k, expected):
    mask = torch.zeros(numel_, dtype=torch.bool)
    mask[:active] = True
    weight = torch.arange(1, numel_ + 1, dtype=torch.float32) * mask
    score = torch.rand(numel_, generator=gen(0))
    new, dropped, grown = drop_and_grow(weight, mask, score, k)
    assert int(dropped.sum()) == int(grown.sum()) == expected
    assert int(new.sum()) == active


def test_drop_and_grow_rejects_bad_input():
    w = torch.ones(4)
    with pytest.raises(ValueError, match="k must be"):
        drop_and_grow(w, w.bool(), w, -1)
    with pytest.raises(TypeError):
        drop_and_grow(w, w, w, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        drop_and_grow(w, w.bool(), torch.ones(5), 1)


def test_drop_fraction_k_rounds_to_nearest():
    assert drop_fraction_k(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996: floor would give 28
    assert drop_fraction_k(10, 0.5) == 5
    assert drop_fraction_k(7, 0.5) == 4  # 3.5 -> 4 (half to even)
    assert drop_fraction_k(5, 0.5) == 2  # 2.5 -> 2 (half to even)
    assert drop_fraction_k(1000, 0.0) == 0
    with pytest.raises(ValueError):
        drop_fraction_k(10, 1.5)


# --------------------------------------------------------------------------------------------------------------------
# Packing, checksums and seeds.


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 3, 3), (4, 4, 3, 3), (13, 1, 1, 1), (1, 257)])
def test_pack_unpack_round_trip(shape):
    for seed in range(3):
        mask = torch.rand(shape, generator=gen(seed)) < 0.4
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.shape == ((numel(shape) + 7) // 8,)
        assert packed.tolist() == np.packbits(mask.reshape(-1).numpy()).tolist()  # independent reference
        assert torch.equal(unpack_mask(packed, shape), mask)
    full = torch.ones(shape, dtype=torch.bool)
    assert torch.equal(unpack_mask(pack_mask(full), shape), full)


def test_pack_known_bytes():
    m = torch.zeros(3, 5, dtype=torch.bool)
    m[0, 1] = m[1, 0] = m[2, 4] = True  # flat indices 1, 5, 14
    assert pack_mask(m).tolist() == [0b01000100, 0b00000010]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="length 2"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (3, 5))


def test_mask_checksum():
    mask = torch.rand(6, 7, generator=gen(0)) < 0.5
    c = mask_checksum(mask)
    assert 0 <= c < 2**63
    assert mask_checksum(mask.clone()) == c
    seen = {c}
    for i in range(mask.numel()):
        flipped = mask.clone().reshape(-1)
        flipped[i] = ~flipped[i]
        seen.add(mask_checksum(flipped.reshape(6, 7)))
    assert len(seen) == mask.numel() + 1  # every single-bit flip changes the checksum
    assert mask_checksum(mask.reshape(7, 6)) != c  # same bits, another shape
    # Pinned: the checksum is the same in every process and every run (a salted hash() would fail this).
    m = torch.zeros(3, 5, dtype=torch.bool)
    m[0, 1] = m[1, 0] = m[2, 4] = True
    assert mask_checksum(m) == 9076248944223895717


def test_layer_seed():
    grid = [layer_seed(s, u, layer) for s in range(12) for u in range(12) for layer in range(12)]
    assert len(set(grid)) == len(grid)
    assert all(0 <= x < 2**63 for x in grid)
    assert layer_seed(3, 4, 5) == layer_seed(3, 4, 5)
    assert layer_seed(3, 4, 5) != layer_seed(5, 4, 3)
    assert layer_seed(0, 0, 0) == 2818299332594581598  # pinned across runs and processes
    torch.Generator().manual_seed(layer_seed(2**40, 10**6, 300))  # a valid seed
    with pytest.raises(TypeError):
        layer_seed(1.5, 0, 0)


# --------------------------------------------------------------------------------------------------------------------
# Schedules.


def test_update_steps():
    sched = UpdateSchedule(update_every=100, update_end=0.75, drop_fraction=0.5, total_steps=1000)
    assert [s for s in range(1001) if sched.is_update_step(s)] == [100, 200, 300, 400, 500, 600, 700]
    sched = UpdateSchedule(update_every=250, update_end=0.75, drop_fraction=0.5, total_steps=1000)
    assert [s for s in range(2001) if sched.is_update_step(s)] == [250, 500, 750]  # the end step is included
    assert sched.update_index(750) == 3 and sched.update_index(749) == 2


def test_cosine_drop_fraction():
    sched = UpdateSchedule(update_every=100, update_end=0.75, drop_fraction=0.5, total_steps=1000)
    assert sched.drop_fraction_at(0) == 0.5
    assert sched.drop_fraction_at(375) == pytest.approx(0.25, abs=1e-15)
    assert sched.drop_fraction_at(250) == pytest.approx(0.375, abs=1e-15)  # cos(pi/3) = 1/2
    assert sched.drop_fraction_at(750) == 0.0
    assert sched.drop_fraction_at(5000) == 0.0  # clamped: no climb back after update_end
    values = [sched.drop_fraction_at(s) for s in range(0, 751, 10)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(update_every=0), "update_every"),
        (dict(update_end=0.0), "update_end"),
        (dict(update_end=1.1), "update_end"),
        (dict(drop_fraction=1.0), "drop_fraction"),
        (dict(drop_fraction=-0.1), "drop_fraction"),
        (dict(total_steps=0), "total_steps"),
    ],
)
def test_update_schedule_validation(kwargs, match):
    base = dict(update_every=100, update_end=0.75, drop_fraction=0.5, total_steps=1000)
    with pytest.raises(ValueError, match=match):
        UpdateSchedule(**{**base, **kwargs})


def test_gmp_density():
    kw = dict(initial_density=1.0, final_density=0.2, start_step=100, end_step=200)
    assert gmp_density(0, **kw) == 1.0
    assert gmp_density(100, **kw) == 1.0
    assert gmp_density(200, **kw) == 0.2
    assert gmp_density(10_000, **kw) == 0.2
    # Midpoint: s = 0.8 + (0 - 0.8) * (1/2)**3 = 0.7.
    assert gmp_density(150, **kw) == pytest.approx(0.3, abs=1e-15)
    # A quarter in: s = 0.8 - 0.8 * (3/4)**3 = 0.4625.
    assert gmp_density(125, **kw) == pytest.approx(0.5375, abs=1e-15)
    values = [gmp_density(t, **kw) for t in range(0, 301)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[150] > values[151]
    with pytest.raises(ValueError, match="end_step"):
        gmp_density(0, initial_density=1.0, final_density=0.2, start_step=5, end_step=5)
    with pytest.raises(ValueError, match="final_density"):
        gmp_density(0, initial_density=1.0, final_density=0.0, start_step=0, end_step=5)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("levels", [3, 50, 100_000])  # few distinct values: many ties; many: almost none
def test_select_top_equals_the_first_k_of_a_stable_sort(largest: bool, levels: int) -> None:
    from sgtrain.sparse.topology import select_top

    generator = torch.Generator().manual_seed(levels)
    for trial in range(20):
        n = 1 + trial * 37
        values = torch.randint(levels, (n,), generator=generator).float()
        candidates = torch.rand(n, generator=generator) < 0.6
        for k in (0, 1, n // 3, int(candidates.sum()), n + 5):
            idx = candidates.nonzero().squeeze(1)
            expected = idx[torch.sort(values[idx], descending=largest, stable=True).indices[:k]]
            got = select_top(candidates, values, k, largest=largest)
            assert sorted(got.tolist()) == sorted(expected.tolist())
