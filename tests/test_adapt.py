"""ADAPT (``sparse.method: adapt``): D's density decided from the balance window and changed through the sharded mask
path; G's drop-and-grow over the whole network. Expected masks are recomputed here from the weights and gradients
(a stable sort over the layers' concatenation), never read back from the manager.

The manager is driven as the training loop drives it, with given gradients and balance samples and no optimizer
step, so that the weights (and with them every choice) are known; the end-to-end tests at the bottom run the loop
itself, on 1 and 2 gloo processes and across a resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from multiprocess import assert_all_succeeded, run_ranks
from test_distributed import TINY

from sgtrain import checkpoint
from sgtrain.comm import LocalComm
from sgtrain.config import Config, ConfigError, config_from_dict, config_to_dict, load_config
from sgtrain.dist import Dist
from sgtrain.parts import build_training
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.layers import Layer
from sgtrain.sparse.manager import MaskManager
from sgtrain.sparse.methods import ADAPT
from sgtrain.sparse.sync import Sharding
from sgtrain.sparse.topology import drop_fraction_k, mask_checksum
from sgtrain.step import GanStep, StepResult
from sgtrain.train import Hooks, train, training_loop

ADAPT_TINY = {
    "sparse.method": "adapt",
    "sparse.density_g": 0.2,
    "sparse.density_d": 0.3,
    "sparse.targets": "conv_linear",
    "sparse.adapt.sample_every": 1,
    "sparse.adapt.window": 2,
    "sparse.adapt.update_every": 2,
}
ALWAYS_GROW = {"sparse.adapt.lower": -2000.0, "sparse.adapt.upper": -1000.0}  # every ratio is >= upper
ALWAYS_SHRINK = {"sparse.adapt.lower": 1000.0, "sparse.adapt.upper": 2000.0}  # every ratio is <= lower


def config(run_dir: str | Path = "runs/adapt-test", **overrides: Any) -> Config:
    values = {**TINY, **ADAPT_TINY, "run_dir": str(run_dir), "train.steps": 100}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_config(None, values)


def sample(ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits whose balance ratio is ``ratio``: real 1, before 0, after ``ratio``."""
    return torch.tensor([1.0, 1.0]), torch.tensor([0.0]), torch.tensor([ratio])


def integer_grads(module: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    """Small integers: many ties (so the tie rule is exercised) and sums that are exact whatever the order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(-6, 7, p.shape, generator=generator).float() for p in module.parameters()]


def drive(
    masks: MaskManager,
    G: torch.nn.Module,
    D: torch.nn.Module,
    steps: range,
    ratio: float,
    grads: Any = None,
    probe: Any = None,
) -> list[dict[str, float]]:
    """The loop's calls around topology updates with given gradients (``grads(step, net, module)``) and one balance
    sample of ``ratio`` at each sampling step; no optimizer step. ``probe(step)`` runs just before each update."""
    grads = grads or (lambda step, net, module: integer_grads(module, 10 * step + (net == "G")))
    metrics = []
    for step in steps:
        for net, module in (("D", D), ("G", G)):
            for p, g in zip(module.parameters(), grads(step, net, module), strict=True):
                p.grad = g.clone()
            masks.before_step(net)
            masks.after_step(net)
        if masks.balance_every and step % masks.balance_every == 0:
            masks.observe_balance(*sample(ratio))
        if probe is not None:
            probe(step)
        metrics.append(masks.maybe_update(step))
    return metrics


def manager(cfg: Config) -> tuple[MaskManager, torch.nn.Module, torch.nn.Module]:
    G, D, _, _, masks = build_training(cfg)
    masks.initialize()
    return masks, G, D


def d_total(masks: MaskManager) -> int:
    return sum(layer.numel for layer in masks.layers["D"])


def assert_exact(masks: MaskManager, density: float | None = None) -> None:
    """Every layer's count is its mask's, weights are zero off it; D holds round(density * total) weights."""
    for layer in masks._all_layers():
        assert layer.count == int(layer.mask.sum()), layer.name
        assert torch.all(layer.param.detach()[~layer.mask] == 0), layer.name
    if density is not None:
        assert sum(layer.count for layer in masks.layers["D"]) == round(density * d_total(masks))


def top_k_over(layers: list[Layer], allowed: list[torch.Tensor], values: list[torch.Tensor], k: int) -> list:
    """Reference: the k largest values among the allowed positions of the layers' concatenation, ties to the lower
    position (a stable sort), split back by layer."""
    flat_allowed = torch.cat([a.reshape(-1) for a in allowed])
    flat_values = torch.cat([v.reshape(-1).float() for v in values])
    candidates = flat_allowed.nonzero().squeeze(1)
    order = torch.sort(-flat_values[candidates], stable=True).indices
    chosen = torch.zeros_like(flat_allowed)
    chosen[candidates[order[:k]]] = True
    return [
        part.reshape(layer.mask.shape)
        for layer, part in zip(layers, chosen.split([x.numel for x in layers]), strict=True)
    ]


# --------------------------------------------------------------------------------------------------------------------
# One threshold over many layers.


def _layers(generator: torch.Generator, values: int) -> list[Layer]:
    layers = []
    for i, shape in enumerate([(3, 4), (5,), (2, 2, 3), (7, 1)]):
        weight = torch.randint(0, values, shape, generator=generator).float() / 3
        mask = torch.rand(shape, generator=generator) < 0.5
        param = torch.nn.Parameter(weight * mask)
        layers.append(Layer("D", f"l{i}", i, param, 0.5, int(mask.sum()), mask=mask, union=mask.clone()))
    return layers


@pytest.mark.parametrize("values", [3, 1000])  # heavy ties, and almost none
def test_top_over_layers_is_select_top_over_the_concatenation(values: int) -> None:
    generator = torch.Generator().manual_seed(values)
    for trial in range(60):
        layers = _layers(generator, values)
        allowed = [layer.mask for layer in layers]
        total = sum(int(a.sum()) for a in allowed)
        for k in (0, 1, total // 2, total - 1, total, total + 3):
            chosen = Sharding(LocalComm()).top_over_layers(layers, lambda x: (x.mask, x.param.abs()), k)
            expected = top_k_over(layers, allowed, [layer.param.detach().abs() for layer in layers], max(k, 0))
            for layer, want in zip(layers, expected, strict=True):
                assert torch.equal(chosen[layer.index].reshape(want.shape), want), (trial, k, layer.name)


def test_top_over_layers_orders_negative_zero_nan_and_inf() -> None:
    param = torch.nn.Parameter(torch.zeros(6))
    mask = torch.ones(6, dtype=torch.bool)
    layer = Layer("D", "l", 0, param, 1.0, 6, mask=mask, union=mask.clone())
    values = torch.tensor([-0.0, float("nan"), float("inf"), 1e-30, 0.0, 2.0])
    chosen = Sharding(LocalComm()).top_over_layers([layer], lambda x: (x.mask, values), 3)
    assert chosen[0].tolist() == [False, False, True, True, False, True]  # inf, 2, 1e-30; -0, NaN, 0 tie at zero
    chosen = Sharding(LocalComm()).top_over_layers([layer], lambda x: (x.mask, values), 4)
    assert chosen[0].tolist() == [True, False, True, True, False, True]  # the first of the zeros


# --------------------------------------------------------------------------------------------------------------------
# D's density: up above the upper bound, down below the lower, held inside; exact counts after every change.


def test_density_grows_by_the_step_above_the_upper_bound_up_to_dense() -> None:
    masks, G, D = manager(config())
    densities = []

    def probe(step: int) -> None:
        densities.append(masks.method.d_density)

    drive(masks, G, D, range(1, 33), ratio=0.9, probe=probe)
    # Decisions at 2, 4, ...; from 0.3 by 0.05 to 1.0 (14 growths), then "want to grow, do nothing" (relax).
    decided = [masks.method.d_density]
    assert densities[2::2][:14] == [round(0.3 + 0.05 * i, 12) for i in range(1, 15)]
    assert decided == [1.0] and masks.method.decision == "hold"
    assert_exact(masks, 1.0)
    assert all(bool(layer.mask.all()) for layer in masks.layers["D"])


def test_density_shrinks_below_the_lower_bound_down_to_the_floor_and_holds_between() -> None:
    masks, G, D = manager(config())
    seen = []
    drive(masks, G, D, range(1, 21), ratio=0.1, probe=lambda step: seen.append(masks.method.d_density))
    assert seen[2::2] == [0.25, 0.2, 0.15, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05]
    assert_exact(masks, 0.05)
    before = {layer.name: layer.mask.clone() for layer in masks.layers["D"]}
    drive(masks, G, D, range(21, 29), ratio=0.5)  # inside the bounds: nothing changes
    assert masks.method.d_density == 0.05 and masks.method.decision == "hold"
    assert all(torch.equal(layer.mask, before[layer.name]) for layer in masks.layers["D"])


def test_a_growth_adds_the_largest_gradients_of_the_network_and_a_shrink_keeps_its_largest_weights() -> None:
    for ratio, density in ((0.9, 0.35), (0.1, 0.25)):
        masks, G, D = manager(config())
        layers = masks.layers["D"]
        seen: dict[str, Any] = {}
        drive(masks, G, D, range(1, 2), ratio)  # fills the window's first sample

        def probe(step: int, seen: dict = seen, layers: list = layers) -> None:
            seen["masks"] = [layer.mask.clone() for layer in layers]
            seen["weights"] = [layer.param.detach().abs().clone() for layer in layers]
            seen["grads"] = [layer.param.grad.abs().clone() for layer in layers]  # the D gradient of this step

        drive(masks, G, D, range(2, 3), ratio, probe=probe)
        target, active = round(density * d_total(masks)), sum(int(m.sum()) for m in seen["masks"])
        if ratio > 0.5:  # grown: the old mask plus the inactive weights of largest |gradient| over the network
            inactive = [~m for m in seen["masks"]]
            grown = top_k_over(layers, inactive, seen["grads"], target - active)
            expected = [old | new for old, new in zip(seen["masks"], grown, strict=True)]
        else:  # shrunk: the active weights of largest magnitude over the network
            expected = top_k_over(layers, seen["masks"], seen["weights"], target)
        for layer, want in zip(layers, expected, strict=True):
            assert torch.equal(layer.mask, want), layer.name
        assert masks.method.d_density == density
        assert_exact(masks, density)
        # One threshold, not one per layer: the layers' densities drift apart from the distribution's.
        counts = active_counts(
            {x.name: tuple(x.param.shape) for x in layers},
            layer_densities({x.name: tuple(x.param.shape) for x in layers}, density, kind="ERK"),
        )
        assert any(layer.count != counts[layer.name] for layer in layers)


def test_layer_selection_keeps_the_distributions_counts_after_every_change() -> None:
    for ratio in (0.9, 0.1):
        masks, G, D = manager(config(sparse__adapt__selection="layer"))
        layers = masks.layers["D"]
        shapes = {x.name: tuple(x.param.shape) for x in layers}
        for end in (3, 5, 7):
            drive(masks, G, D, range(end - 2, end), ratio)  # a decision at end - 1
            density = masks.method.d_density
            expected = active_counts(shapes, layer_densities(shapes, density, kind="ERK"))
            assert {x.name: x.count for x in layers} == expected
            assert_exact(masks)
        assert masks.method.d_density == (0.45 if ratio > 0.5 else 0.15)


def test_strict_stops_at_its_cap_and_then_drops_and_regrows_at_fixed_density() -> None:
    masks, G, D = manager(config(sparse__adapt__variant="strict", sparse__adapt__cap=0.4))
    layers = masks.layers["D"]
    seen: dict[str, Any] = {}

    def probe(step: int) -> None:
        seen[step] = ([x.mask.clone() for x in layers], [x.param.detach().abs().clone() for x in layers])
        seen[step] += ([x.param.grad.abs().clone() for x in layers],)

    decisions = []
    for step in range(1, 9):
        drive(masks, G, D, range(step, step + 1), ratio=0.9, probe=probe)
        if step % 2 == 0:
            decisions.append((masks.method.decision, masks.method.d_density))
    assert decisions == [("grow", 0.35), ("grow", 0.4), ("explore", 0.4), ("explore", 0.4)]
    assert_exact(masks, 0.4)
    # The exploration at step 8: the cosine's fraction of the active weights, smallest |w| over the network
    # dropped, as many inactive ones of largest |gradient| grown.
    old, weights, grads = seen[8]
    active = sum(int(m.sum()) for m in old)
    fraction = 0.005 + (0.5 - 0.005) / 2 * (1 + math.cos(math.pi * 8 / 100))
    k = drop_fraction_k(active, fraction)
    kept = top_k_over(layers, old, weights, active - k)
    grown = top_k_over(layers, [~m for m in old], grads, k)
    for layer, a, b in zip(layers, kept, grown, strict=True):
        assert torch.equal(layer.mask, a | b), layer.name
    assert k > 0 and any(not torch.equal(x.mask, m) for x, m in zip(layers, old, strict=True))


def test_no_decision_rests_on_a_partial_window() -> None:
    masks, G, D = manager(config(sparse__adapt__window=3))
    drive(masks, G, D, range(1, 3), ratio=0.9)  # the decision at 2 sees 2 of 3 samples
    assert masks.method.d_density == 0.3 and masks.method.decisions == 0
    drive(masks, G, D, range(3, 5), ratio=0.9)
    assert masks.method.d_density == 0.35 and masks.method.decisions == 1


def test_samples_without_a_finite_ratio_are_left_out_of_the_window() -> None:
    masks, *_ = manager(config(sparse__adapt__window=3))
    masks.observe_balance(*sample(0.75))
    masks.observe_balance(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.7]))  # D scores reals as fakes
    masks.observe_balance(torch.tensor([1.0]), torch.tensor([float("nan")]), torch.tensor([0.0]))
    masks.observe_balance(*sample(0.25))
    assert [float(row[2]) for row in masks.method.window.samples] == [0.75, 0.25]
    assert masks.status()["adapt/dropped_samples"] == 2 and masks.status()["adapt/balance_ratio"] == 0.5


def test_g_does_not_explore_after_the_last_step() -> None:
    masks, G, D = manager(config(train__steps=6, sparse__update_every=3, sparse__adapt__update_every=1000))
    drive(masks, G, D, range(1, 6), ratio=0.5)
    before = {x.name: x.mask.clone() for x in masks.layers["G"]}
    assert masks.method.wants_gradient(masks.layers["G"][0], 5) is False  # no score kept for step 6
    assert drive(masks, G, D, range(6, 7), ratio=0.5) == [{}]
    assert all(torch.equal(x.mask, before[x.name]) for x in masks.layers["G"])


def test_gs_drop_and_grow_is_global_and_keeps_gs_count() -> None:
    masks, G, D = manager(config(sparse__update_every=3, sparse__adapt__update_every=1000))
    layers = masks.layers["G"]
    seen: dict[str, Any] = {}

    def probe(step: int) -> None:
        if step == 3:
            seen["old"] = [x.mask.clone() for x in layers]
            seen["weights"] = [x.param.detach().abs().clone() for x in layers]
            seen["grads"] = [x.param.grad.abs().clone() for x in layers]

    drive(masks, G, D, range(1, 4), ratio=0.5, probe=probe)
    active = sum(int(m.sum()) for m in seen["old"])
    k = drop_fraction_k(active, masks.method.schedule.drop_fraction_at(3))
    kept = top_k_over(layers, seen["old"], seen["weights"], active - k)
    grown = top_k_over(layers, [~m for m in seen["old"]], seen["grads"], k)
    for layer, a, b in zip(layers, kept, grown, strict=True):
        assert torch.equal(layer.mask, a | b), layer.name
    assert sum(x.count for x in layers) == active and k > 0
    assert_exact(masks)


def test_the_method_state_round_trips_and_a_damaged_one_is_refused() -> None:
    masks, G, D = manager(config(sparse__adapt__window=3))
    drive(masks, G, D, range(1, 6), ratio=0.9)
    state = masks.state_dict()
    assert state["method_state"]["d_density"] == 0.35 and len(state["method_state"]["window"]["samples"]) == 3
    again, *_ = manager(config(sparse__adapt__window=3))
    again.load_state_dict(state)
    assert (
        again.method.state_dict()["window"]["samples"].tolist() == state["method_state"]["window"]["samples"].tolist()
    )
    assert again.method.d_density == 0.35
    other, *_ = manager(config(sparse__adapt__window=4))
    with pytest.raises(ConfigError, match="window"):
        other.load_state_dict(state)
    state["method_state"]["d_density"] = 0.5
    with pytest.raises(ConfigError, match=r"ADAPT density 0\.5"):
        again.load_state_dict(state)
    capped, *_ = manager(config(sparse__adapt__window=3, sparse__adapt__variant="strict", sparse__adapt__cap=0.3))
    state["method_state"]["d_density"] = 0.35
    with pytest.raises(ConfigError, match=r"outside this run's ADAPT range \[0\.05, 0\.3\]"):
        capped.load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sparse.explore": "GD"}, "sparse.explore must be G or none"),
        ({"sparse.density_d": 0.02}, "must lie within ADAPT's range"),
        ({"sparse.adapt.variant": "strict", "sparse.density_d": 0.6}, "must lie within ADAPT's range"),
        ({"sparse.adapt.variant": "loose"}, "sparse.adapt.variant must be one of relax, strict"),
        ({"sparse.adapt.lower": 0.6}, "sparse.adapt.lower < sparse.adapt.upper"),
        ({"sparse.adapt.window": 0}, "sparse.adapt.window must be >= 1"),
        ({"sparse.adapt.selection": "local"}, "sparse.adapt.selection must be one of global, layer"),
        ({"sparse.adapt.grow": "magnitude"}, "sparse.adapt.grow must be one of"),
        ({"sparse.dense_first_last": True}, "use sparse.adapt.selection: layer with it"),
    ],
)
def test_bad_adapt_settings_are_one_line_config_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**ADAPT_TINY, **overrides})


def test_the_variants_take_the_authors_script_defaults() -> None:
    relax = load_config(None, {"sparse.method": "adapt", "sparse.density_g": 0.1, "sparse.density_d": 0.1})
    strict = load_config(
        None,
        {"sparse.method": "adapt", "sparse.adapt.variant": "strict", "sparse.density_g": 0.3, "sparse.density_d": 0.3},
    )
    assert (relax.sparse.adapt.decide_every, relax.sparse.adapt.highest) == (1000, 1.0)
    assert (strict.sparse.adapt.decide_every, strict.sparse.adapt.highest) == (2000, 0.5)
    a = relax.sparse.adapt
    assert (a.lower, a.upper, a.step, a.minimum, a.sample_every, a.window) == (0.45, 0.55, 0.05, 0.05, 10, 100)
    assert (a.grow, a.selection, a.explore_drop_fraction, a.explore_drop_fraction_min) == (
        "gradient",
        "global",
        0.5,
        0.005,
    )


# --------------------------------------------------------------------------------------------------------------------
# Distributed: 2 ranks with their own data decide and select as 1 process on the global batch.


def _recorded(rank: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    cfg = config_from_dict(cfg_dict)
    records: list[dict[str, Any]] = []
    masks: dict[str, torch.Tensor] = {}  # "step/layer" -> mask after that step's topology update

    def after_iteration(step: int, gan: GanStep, result: StepResult) -> None:
        method = gan.masks.method
        entry = {"step": step, "density": method.d_density, "decision": method.decision, "ratio": method.ratio}
        if result.topology:
            entry["masks"] = {f"{x.net}.{x.name}": mask_checksum(x.mask) for x in gan.masks._all_layers()}
            masks.update({f"{step}/{x.net}.{x.name}": x.mask.detach().bool().clone() for x in gan.masks._all_layers()})
        records.append(entry)

    dist = Dist()
    try:
        training_loop(cfg, dist, hooks=Hooks(after_iteration=after_iteration))
    finally:
        dist.shutdown()
    Path(out_dir, f"rank{rank}-of-{dist.world_size}.json").write_text(json.dumps(records))
    torch.save(masks, Path(out_dir, f"rank{rank}-of-{dist.world_size}-masks.pt"))


@pytest.mark.parametrize("bounds", ["grow", "shrink"])
def test_two_ranks_with_different_data_take_one_processs_decisions_and_masks(tmp_path: Path, bounds: str) -> None:
    settings = {**(ALWAYS_GROW if bounds == "grow" else ALWAYS_SHRINK), "sparse.update_every": 3}
    settings.update({"train.steps": 8, "train.adam_eps": 1e-4, "sparse.adapt.variant": "strict"})
    settings["sparse.adapt.cap"] = 0.4  # grow, grow, explore
    cfg = {**config_to_dict(config(tmp_path / "run", **settings))}
    assert_all_succeeded(run_ranks(_recorded, cfg, str(tmp_path), world_size=1))
    cfg["run_dir"] = str(tmp_path / "run2")
    assert_all_succeeded(run_ranks(_recorded, cfg, str(tmp_path)))
    one, *two = (json.loads((tmp_path / name).read_text()) for name in ("rank0-of-1.json", "rank0-of-2.json"))
    two.append(json.loads((tmp_path / "rank1-of-2.json").read_text()))
    assert two[0] == two[1]  # the ranks read different images and hold the same densities, decisions and masks
    decisions = [(r["decision"], r["density"]) for r in one if r["step"] in (2, 4, 6)]  # none at the last step
    expected = (
        [("grow", 0.35), ("grow", 0.4), ("explore", 0.4)]
        if bounds == "grow"
        else [("shrink", 0.25), ("shrink", 0.2), ("shrink", 0.15)]
    )
    assert decisions == expected
    for a, b in zip(one, two[0], strict=True):  # and 1 process on the same global batch took the same ones
        assert (a["step"], a["density"], a["decision"], "masks" in a) == (
            b["step"],
            b["density"],
            b["decision"],
            "masks" in b,
        )
        if a["ratio"] is not None:
            assert b["ratio"] == pytest.approx(a["ratio"], rel=1e-4, abs=1e-5)
    # The same masks, up to fp32 near-ties: 1 x 8 images and 2 x 4 sum G's gradients and Adam's steps in a different
    # order, and which CPU runs the test decides whether a gradient at the growth threshold lands on one side or the
    # other (on CI's CPU 2 G layers came out different). A swap at the threshold moves 2 entries (and, with
    # the selection over the network, may move a weight between layers); growing or dropping on anything but the global
    # batch's scores moves a large part of an update (here 28-218 entries per G layer), which this still catches.
    single = torch.load(tmp_path / "rank0-of-1-masks.pt", weights_only=True)
    double = torch.load(tmp_path / "rank0-of-2-masks.pt", weights_only=True)
    assert single.keys() == double.keys() and single
    for step in {key.split("/")[0] for key in single}:  # the same number of weights per network, exactly
        for net in ("G", "D"):
            prefix = f"{step}/{net}."
            assert sum(int(m.sum()) for k, m in single.items() if k.startswith(prefix)) == sum(
                int(m.sum()) for k, m in double.items() if k.startswith(prefix)
            ), prefix
    for key, mask in single.items():  # and in each layer the same weights but for a few at the threshold
        moved = int((mask != double[key]).sum())
        assert moved <= max(4, int(0.01 * mask.sum())), f"{key}: {moved} of {int(mask.sum())} entries differ"


def _sharded_adapt(rank: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    dist = Dist()
    try:
        G, D, _, _, masks = build_training(config_from_dict(cfg_dict), comm=dist, local_scores=True)
        masks.initialize()
        drive(masks, G, D, range(1, 7), 0.9, grads=lambda step, net, module: integer_grads(module, 100 * rank + step))
        owners = {f"{x.net}.{x.name}": x.owner for x in masks._all_layers()}
        state = {"masks": {f"{x.net}.{x.name}": x.mask.clone() for x in masks._all_layers()}, "owners": owners}
        torch.save(state, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.shutdown()


def test_sharded_changes_equal_one_process_on_the_summed_gradients(tmp_path: Path) -> None:
    """Local gradients (no DDP): the owners select on the sums, with one threshold found from counts alone."""
    cfg = config_to_dict(config(tmp_path / "run", sparse__update_every=3, sparse__adapt__variant="strict"))
    assert_all_succeeded(run_ranks(_sharded_adapt, cfg, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for net in ("G", "D"):  # both ranks own layers of each network: the selection really was split
        assert {owner for name, owner in ranks[0]["owners"].items() if name.startswith(net)} == {0, 1}
    masks, G, D = manager(config_from_dict(cfg))

    def summed(step: int, net: str, module: torch.nn.Module) -> list[torch.Tensor]:
        return [a + b for a, b in zip(integer_grads(module, step), integer_grads(module, 100 + step), strict=True)]

    drive(masks, G, D, range(1, 7), 0.9, grads=summed)
    assert masks.method.d_density == 0.45  # three growths: the selection of grown weights was exercised
    for x in masks._all_layers():
        for rank in range(2):
            assert torch.equal(ranks[rank]["masks"][f"{x.net}.{x.name}"], x.mask), f"rank {rank}: {x.net}.{x.name}"


# --------------------------------------------------------------------------------------------------------------------
# The loop: exact resume mid-window, FLOPs at the density used, the records.


class _Killed(Exception):
    pass


def test_a_run_resumed_in_the_middle_of_a_window_ends_equal_to_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, assert_trees_equal: Any
) -> None:
    def make(run_dir: Path) -> Config:
        # Samples every step into a window of 6, a decision at 8: the checkpoint at 5 holds 5 of its 6 samples.
        return config(
            run_dir,
            train__steps=10,
            train__checkpoint_every=5,
            sparse__adapt__window=6,
            sparse__adapt__update_every=8,
            sparse__update_every=3,
            **{key.replace(".", "__"): value for key, value in ALWAYS_GROW.items()},
        )

    train(make(tmp_path / "straight"))
    real_save = checkpoint.save_checkpoint

    def save_then_die(run_dir: Any, step: int, state: Any, keep: Any) -> Path:
        path = real_save(run_dir, step, state, keep)
        if step == 5:
            raise _Killed
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(make(tmp_path / "split"))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    halfway = checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / "split")[-1])
    assert len(halfway["masks"]["method_state"]["window"]["samples"]) == 5
    train(make(tmp_path / "split"))
    a, b = (checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / r)[-1]) for r in ("split", "straight"))
    for key in ("position", "G", "D", "ema", "opt_g", "opt_d", "masks", "rng"):
        assert_trees_equal(a[key], b[key], key)
    assert a["masks"]["method_state"]["d_density"] == 0.35  # the decision after the resume happened


def test_training_flops_follow_the_density_each_iteration_trains_with(tmp_path: Path) -> None:
    from sgtrain.flops import balance_flops, dense_weight_gradients, flops_report, layers_iteration_flops

    cfg = config(tmp_path / "run", train__steps=6, **{k.replace(".", "__"): v for k, v in ALWAYS_SHRINK.items()})
    densities: list[tuple[dict, dict]] = []

    def after_iteration(step: int, gan: GanStep, result: StepResult) -> None:
        densities.append((gan.masks.layer_densities("G"), gan.masks.layer_densities("D")))

    dist = Dist()
    try:
        training_loop(cfg, dist, hooks=Hooks(after_iteration=after_iteration))
    finally:
        dist.shutdown()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train_flops" in r]
    G, D, *_, masks = build_training(cfg)
    masks.initialize()
    m = cfg.model
    report = flops_report(G, D, resolution=m.resolution, n_classes=m.n_classes, dim_z=m.dim_z, batch_size=1, d_steps=1)
    used = [(masks.layer_densities("G"), masks.layer_densities("D")), *densities[:-1]]  # at each iteration's start
    total = 0.0
    for g, d in used:
        total += layers_iteration_flops(
            report["G"]["layers"],
            report["D"]["layers"],
            g,
            d,
            batch_size=8,
            d_steps=cfg.train.d_steps,
            dense_weight_grads=dense_weight_gradients(cfg.sparse),
        )
        total += balance_flops(report["G"]["layers"], report["D"]["layers"], g, d, 8)  # sampled every iteration
    assert train_records[-1]["train_flops"] == pytest.approx(total, rel=1e-12)
    # Decisions at 2 and 4; none at the last step (as in the authors' code).
    assert [r["adapt/D_density"] for r in train_records] == [0.3, 0.25, 0.25, 0.2, 0.2, 0.2]
    assert [round(r["sparse/D_density"], 3) for r in train_records] == [0.3, 0.25, 0.25, 0.2, 0.2, 0.2]
    assert all(
        {"adapt/lower", "adapt/upper", "adapt/balance_ratio", "sparse/G_density"} <= set(r) for r in train_records
    )
    assert isinstance(masks.method, ADAPT)
