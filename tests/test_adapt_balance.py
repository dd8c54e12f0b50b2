"""ADAPT's balance ratio and density rule (sgtrain/sparse/balance.py): exact values, the window, resume, the rule's
every branch, and 2 gloo ranks with different data holding the same window as one process on the global batch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from multiprocess import assert_all_succeeded, run_ranks

from sgtrain.comm import LocalComm
from sgtrain.sparse.balance import (
    EXPLORE,
    GROW,
    HOLD,
    SHRINK,
    BalanceWindow,
    balance_ratios,
    global_means,
    next_density,
)

RULE = {"lower": 0.45, "upper": 0.55, "step": 0.05, "minimum": 0.05}  # the authors' scripts


def test_balance_ratio_is_the_moved_fraction_of_the_gap_per_sample() -> None:
    # real 2, before -1, after 0.5: the step moved the fakes 1.5 of the gap of 3 -> 0.5; a step that moved them
    # past the reals gives more than 1, one that moved them away a negative ratio.
    samples = torch.tensor([[2.0, -1.0, 0.5], [1.0, 0.0, 1.5], [0.0, -2.0, -3.0]], dtype=torch.float64)
    assert balance_ratios(samples).tolist() == [0.5, 1.5, -0.5]


def test_global_means_are_means_over_every_logit() -> None:
    real, before, after = torch.tensor([1.0, 3.0]), torch.tensor([[-1.0], [0.0], [1.0]]), torch.tensor([2.0])
    assert global_means(real, before, after, LocalComm()).tolist() == [2.0, 0.0, 2.0]


def test_the_window_ratio_is_the_mean_of_the_latest_ratios_once_full() -> None:
    window = BalanceWindow(size=2)
    window.add(torch.tensor([2.0, -1.0, 0.5]))  # 0.5
    assert window.ratio() is None  # never a decision on a partial window
    window.add(torch.tensor([1.0, 0.0, 1.5]))  # 1.5
    assert window.ratio() == 1.0
    window.add(torch.tensor([0.0, -2.0, -3.0]))  # -0.5; the 0.5 falls out
    assert window.ratio() == 0.5
    assert len(window.samples) == 2


def test_a_resumed_window_continues_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(3, generator=generator) for _ in range(7)]
    straight, first = BalanceWindow(size=4), BalanceWindow(size=4)
    for sample in samples:
        straight.add(sample)
    for sample in samples[:3]:
        first.add(sample)
    resumed = BalanceWindow(size=4)
    resumed.load_state_dict(first.state_dict())
    for sample in samples[3:]:
        resumed.add(sample)
    assert torch.equal(resumed.state_dict()["samples"], straight.state_dict()["samples"])
    assert resumed.ratio() == straight.ratio()
    with pytest.raises(ValueError, match="holds 4 samples, this run 5"):
        BalanceWindow(size=5).load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    ("density", "ratio", "cap", "explore", "expected"),
    [
        (0.3, 0.60, 1.0, False, (0.35, GROW)),  # D too weak: one step up
        (0.3, 0.55, 1.0, False, (0.35, GROW)),  # the bound itself counts (>=)
        (0.3, 0.40, 1.0, False, (0.25, SHRINK)),  # D too strong: one step down
        (0.3, 0.45, 1.0, False, (0.25, SHRINK)),  # (<=)
        (0.3, 0.50, 1.0, False, (0.3, HOLD)),  # within the bounds
        (0.05, 0.10, 1.0, False, (0.05, HOLD)),  # at the floor
        (0.08, 0.10, 1.0, False, (0.05, SHRINK)),  # clipped to the floor
        (1.0, 0.90, 1.0, False, (1.0, HOLD)),  # relax at dense: nothing to grow
        (0.98, 0.90, 1.0, False, (1.0, GROW)),  # clipped to dense
        (0.5, 0.90, 0.5, True, (0.5, EXPLORE)),  # strict at its cap: drop and grow at fixed density
        (0.48, 0.90, 0.5, True, (0.5, GROW)),  # clipped to the cap
        (0.5, 0.20, 0.5, True, (0.45, SHRINK)),  # the cap does not stop a shrink
        (0.3, float("nan"), 1.0, False, (0.3, HOLD)),  # real and fake scores equal: no decision
    ],
)
def test_the_density_rule(density: float, ratio: float, cap: float, explore: bool, expected: tuple) -> None:
    assert next_density(density, ratio, cap=cap, explore_at_cap=explore, **RULE) == expected


def test_stepping_from_0_3_reaches_the_strict_cap_in_four_steps_exactly() -> None:
    density, decisions = 0.3, []
    for _ in range(5):
        density, decision = next_density(density, 0.9, cap=0.5, explore_at_cap=True, **RULE)
        decisions.append(decision)
    assert density == 0.5 and decisions == [GROW, GROW, GROW, GROW, EXPLORE]


def _window_rank(rank: int, out_dir: str) -> None:
    from sgtrain.dist import Dist

    dist = Dist()
    try:
        window = BalanceWindow(size=3)
        for k in range(5):  # each rank's own half of a global batch of 8 logits per term
            logits = torch.arange(24, dtype=torch.float32).reshape(3, 8) * (k + 1) - 10.0
            real, before, after = (row[rank * 4 : (rank + 1) * 4] for row in logits)
            window.add(global_means(real, before, after, dist))
    finally:
        dist.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(window.state_dict()["samples"].tolist()))


def test_two_ranks_with_different_data_hold_the_window_of_the_global_batch(tmp_path: Path) -> None:
    assert_all_succeeded(run_ranks(_window_rank, str(tmp_path)))
    alone = BalanceWindow(size=3)
    for k in range(5):
        real, before, after = torch.arange(24, dtype=torch.float32).reshape(3, 8) * (k + 1) - 10.0
        alone.add(global_means(real, before, after, LocalComm()))
    ranks: list[Any] = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == alone.state_dict()["samples"].tolist()


def test_the_step_hands_over_the_terms_of_the_same_latents_before_and_after_the_g_step() -> None:
    from sgtrain.config import SparseConfig
    from sgtrain.sparse import MaskManager
    from sgtrain.step import GanStep, LocalNetwork

    torch.manual_seed(0)
    G, D = torch.nn.Linear(4, 6), torch.nn.Linear(6, 1)  # an unconditional toy pair: D(x) is one logit per row
    reference_g = copy.deepcopy(G)  # G before the G step of iteration 2
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=0.1), torch.optim.Adam(D.parameters(), lr=0.1)
    masks = MaskManager(
        SparseConfig(method="dense", density_g=1.0, density_d=1.0),
        generator=G,
        discriminator=D,
        optimizers={"G": opt_g, "D": opt_d},
        total_steps=4,
        seed=0,
    )
    masks.initialize()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=generator)
    z_d, z_g = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    handed: list[tuple[torch.Tensor, ...]] = []
    gan = GanStep(
        G=LocalNetwork(G, opt_g),
        D=LocalNetwork(D, opt_d),
        masks=masks,
        balance_every=2,
        on_balance=lambda *terms: handed.append(terms),
    )
    latents = iter([(z_d, None), (z_g, None)] * 2)
    gan(0, lambda: (x, None), lambda: next(latents))
    assert handed == []  # sampled every 2nd iteration only
    reference_g.load_state_dict(G.state_dict())  # as the first iteration left it
    gan(1, lambda: (x, None), lambda: next(latents))
    real, before, after = handed[0]
    with torch.no_grad():  # D after its step of iteration 2 (the G step leaves it alone), as the step's one extra
        scores = D(torch.cat([x, G(z_g)]))  # pass scores the real batch and the updated G's fakes together
        assert torch.equal(real, scores[:5]) and torch.equal(after, scores[5:])
        assert torch.equal(before, D(reference_g(z_g)))  # G as it was before its step of iteration 2
    assert not torch.equal(before, after)  # the G step moved the fakes
    ratio = float(balance_ratios(global_means(real, before, after, LocalComm())[None]))
    expected = (scores[5:].double().mean() - before.double().mean()) / (
        scores[:5].double().mean() - before.double().mean()
    )
    assert ratio == float(expected)
