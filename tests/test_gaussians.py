"""The 2-D mixture-of-Gaussians benchmark: the protocol's figures on hand-made samples, the config, and short runs
whose masks, FLOPs, files and determinism are checked against independent computations."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sgtrain.config import ConfigError
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.study import gaussians
from sgtrain.study.gaussians import (
    gaussians_config,
    mode_centers,
    mode_metrics,
    mode_std,
    sample_real,
    train_gaussians,
)

# A tiny cell: G 2 -> 32 -> 32 -> 2 and D 2 -> 32 -> 32 -> 1, so a run takes well under a second.
TINY: dict[str, Any] = {
    "dataset": "ring8",
    "steps": 30,
    "batch_size": 32,
    "g_hidden": [32, 32],
    "d_hidden": [32, 32],
    "eval_samples": 200,
}
# The Linear layers of nn.Sequential MLPs sit at even indices (ReLUs between them); weight shapes are (out, in).
G_SHAPES = {"0": (32, 2), "2": (32, 32), "4": (2, 32)}
D_SHAPES = {"0": (32, 2), "2": (32, 32), "4": (1, 32)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny MLPs gain nothing from intra-op threads; one thread keeps the runs fast and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes: Any) -> gaussians.GaussiansConfig:
    settings = {**TINY, **changes}
    return gaussians_config(settings)


def expected_counts(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, int]:
    return active_counts(shapes, layer_densities(shapes, density, kind="ERK"))


# --------------------------------------------------------------------------------------------------------------------
# Centres and real samples.


def test_ring_centres_lie_on_the_unit_circle_45_degrees_apart() -> None:
    centres = mode_centers("ring8")
    assert centres.shape == (8, 2)
    assert torch.allclose(centres.norm(dim=1), torch.ones(8), atol=1e-6)
    angles = torch.atan2(centres[:, 1], centres[:, 0]).remainder(2 * math.pi)
    assert torch.allclose(angles, torch.arange(8) * (math.pi / 4), atol=1e-6)
    assert mode_std("ring8") == 0.01


def test_grid_centres_are_the_5x5_lattice_with_spacing_2() -> None:
    centres = mode_centers("grid25")
    assert centres.shape == (25, 2)
    assert {tuple(c) for c in centres.tolist()} == {(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)}
    distances = torch.cdist(centres, centres) + 100 * torch.eye(25)
    assert distances.min().item() == 2.0
    assert mode_std("grid25") == 0.05


def test_unknown_dataset_fails() -> None:
    with pytest.raises(ConfigError, match="ring8, grid25"):
        mode_centers("ring9")
    with pytest.raises(ConfigError):
        mode_std("ring9")


@pytest.mark.parametrize("dataset", ["ring8", "grid25"])
def test_real_samples_are_the_mixture_and_follow_the_generator(dataset: str) -> None:
    draw = sample_real(dataset, 5000, torch.Generator().manual_seed(3))
    assert draw.shape == (5000, 2)
    assert torch.equal(draw, sample_real(dataset, 5000, torch.Generator().manual_seed(3)))
    metrics = mode_metrics(draw, dataset)
    # Real data: every mode, ~99% within 3 std (a 2-D Gaussian: 1 - exp(-9/2) = 0.989), balanced.
    assert metrics["modes_covered"] == metrics["modes_covered_20"] == metrics["modes_total"]
    assert 0.98 < metrics["hq_rate"] < 0.995
    assert metrics["reverse_kl"] < 0.01


# --------------------------------------------------------------------------------------------------------------------
# Metrics on hand-made samples.


@pytest.mark.parametrize("dataset", ["ring8", "grid25"])
def test_samples_on_every_centre_cover_every_mode(dataset: str) -> None:
    centres = mode_centers(dataset)
    k = len(centres)
    metrics = mode_metrics(centres.repeat(100, 1), dataset)
    assert metrics["modes_covered"] == metrics["modes_covered_20"] == metrics["modes_total"] == k
    assert metrics["hq_rate"] == 1.0
    assert metrics["reverse_kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["mode_counts"] == [100] * k


@pytest.mark.parametrize("dataset", ["ring8", "grid25"])
def test_samples_on_one_centre_cover_one_mode(dataset: str) -> None:
    centres = mode_centers(dataset)
    metrics = mode_metrics(centres[3].repeat(2500, 1), dataset)
    assert metrics["modes_covered"] == metrics["modes_covered_20"] == 1
    assert metrics["hq_rate"] == 1.0
    assert metrics["mode_counts"][3] == 2500
    assert metrics["reverse_kl"] == pytest.approx(math.log(len(centres)))  # total collapse: KL(q || uniform) = log K


def test_samples_far_from_every_centre_are_not_high_quality() -> None:
    metrics = mode_metrics(torch.full((2500, 2), 10.0), "grid25")
    assert metrics["hq_rate"] == 0.0
    assert metrics["modes_covered"] == metrics["modes_covered_20"] == 0
    assert metrics["mode_counts"] == [0] * 25


def test_high_quality_means_strictly_within_3_std() -> None:
    # 10 samples 2.9 std right of centre 0 of the ring, 10 samples 3.1 std right of it.
    std = mode_std("ring8")
    near = torch.tensor([[1 + 2.9 * std, 0.0]]).repeat(10, 1)
    far = torch.tensor([[1 + 3.1 * std, 0.0]]).repeat(10, 1)
    metrics = mode_metrics(torch.cat([near, far]), "ring8")
    assert metrics["hq_rate"] == 0.5
    assert metrics["mode_counts"] == [10, 0, 0, 0, 0, 0, 0, 0]


def test_a_mode_needs_one_high_quality_sample_and_20_for_the_strict_rule() -> None:
    centres = mode_centers("ring8")
    samples = torch.cat([centres[0].repeat(19, 1), centres[1].repeat(20, 1), centres[2].repeat(1, 1)])
    metrics = mode_metrics(samples, "ring8")
    assert metrics["modes_covered"] == 3
    assert metrics["modes_covered_20"] == 1


def test_metrics_reject_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        mode_metrics(torch.zeros(10, 3), "ring8")


# --------------------------------------------------------------------------------------------------------------------
# Config.


def test_config_from_a_dict_with_a_nested_sparse_section() -> None:
    cfg = gaussians_config({"dataset": "grid25", "steps": "50", "sparse": {"method": "stu", "density_g": 0.1}})
    assert (cfg.dataset, cfg.steps, cfg.sparse.method, cfg.sparse.density_g) == ("grid25", 50, "stu", 0.1)
    assert cfg.eval_samples == 2500  # the protocol's


def test_unknown_keys_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="stepz"):
        gaussians_config({"stepz": 10})
    with pytest.raises(ConfigError, match=r"sparse\.densty_g"):
        gaussians_config({"sparse": {"densty_g": 0.1}})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dataset": "spiral"}, "dataset must be one of"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"betas": [0.5]}, "betas must be two numbers"),
        ({"g_hidden": []}, "g_hidden must be a non-empty list"),
        ({"sparse": {"method": "prune_finetune", "prune_from": "x.pt"}}, "prune_finetune is not offered"),
        ({"sparse": {"method": "static", "density_g": 0.5, "targets": "conv_only"}}, "no convolutions"),
    ],
)
def test_bad_values_fail_with_one_line(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        gaussians_config(settings)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------------------------
# Training runs.


def test_a_short_stu_run_keeps_every_layer_count_and_writes_its_cell(tmp_path: Path) -> None:
    cfg = tiny(sparse={"method": "stu", "density_g": 0.1, "density_d": 0.5, "explore": "GD", "update_every": 5})
    result = train_gaussians(cfg, tmp_path / "cell")

    # Exact per-layer counts after 6 drop-and-grow updates (steps 5, 10, ..., 30 of 30: update_end 1.0), from the
    # ERK distribution computed here, for both networks (both explore).
    for net, shapes, density in (("G", G_SHAPES, 0.1), ("D", D_SHAPES, 0.5)):
        for name, count in expected_counts(shapes, density).items():
            assert result["layers"][f"{net}.{name}"] == {"active": count, "numel": math.prod(shapes[name])}
    total = sum(math.prod(shape) for shape in G_SHAPES.values())
    assert result["density_g"] == sum(expected_counts(G_SHAPES, 0.1).values()) / total
    assert abs(result["density_g"] - 0.1) <= len(G_SHAPES) / total  # within one weight per layer
    assert result["itop_rate_g"] > result["density_g"]  # the updates explored new positions
    assert 0 < result["train_flops_vs_dense"] < 1

    # The saved generator: no weight outside the budget (grown weights may still be exactly zero, hence <=).
    state = torch.load(io.BytesIO((tmp_path / "cell" / "generator.pt").read_bytes()), weights_only=True)
    for name, count in expected_counts(G_SHAPES, 0.1).items():
        assert int(state[f"{name}.weight"].count_nonzero()) <= count

    # The files: result.json as returned, config.yaml rebuilds the same config, samples.png is a PNG.
    cell = tmp_path / "cell"
    assert json.loads((cell / "result.json").read_text()) == result
    assert gaussians_config(yaml.safe_load((cell / "config.yaml").read_text())) == cfg
    assert (cell / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(cell.glob(".*.tmp"))  # atomic writes leave no temporary file behind
    for key in ("modes_covered", "modes_total", "hq_rate", "steps", "wall_s", "density_d"):
        assert key in result
    assert result["modes_total"] == 8 and result["steps"] == 30


def test_a_complete_cell_is_returned_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(sparse={"method": "static", "density_g": 0.2})
    first = train_gaussians(cfg, tmp_path)

    def no_training(_cfg: Any) -> None:
        raise AssertionError("a complete cell must not train again")

    monkeypatch.setattr(gaussians, "train_networks", no_training)
    assert train_gaussians(cfg, tmp_path) == first
    with pytest.raises(ConfigError, match="other settings"):
        train_gaussians(tiny(seed=1, sparse={"method": "static", "density_g": 0.2}), tmp_path)


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    cfg = tiny(sparse={"method": "stu", "density_g": 0.1, "update_every": 5})
    rng_before = torch.get_rng_state()
    runs = [train_gaussians(cfg, tmp_path / name) for name in ("a", "b")]
    train_gaussians(tiny(seed=1, sparse={"method": "stu", "density_g": 0.1, "update_every": 5}), tmp_path / "c")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global RNG is left alone

    def without_time(result: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in result.items() if key != "wall_s"}

    assert without_time(runs[0]) == without_time(runs[1])
    weights = [
        torch.load(io.BytesIO((tmp_path / name / "generator.pt").read_bytes()), weights_only=True)
        for name in ("a", "b", "c")
    ]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])


def forward_flops(shapes: dict[str, tuple[int, int]], counts: dict[str, int] | None = None) -> float:
    """Per-sample forward FLOPs of the MLP (2 * in * out + out per Linear), each layer scaled by its density."""
    total = 0.0
    for name, (out, inp) in shapes.items():
        density = counts[name] / (out * inp) if counts else 1.0
        total += (2 * inp * out + out) * density
    return total


def test_training_flops_follow_the_densities_of_every_step(tmp_path: Path) -> None:
    # One iteration: G makes B fakes (F_G B), D forward + backward on 2B (3 F_D 2B), G forward + backward through D
    # (3 F_G B + 3 F_D B): 4 F_G + 9 F_D per sample of the batch. Static sparse pays its density from step 1.
    # (In masked mode: weight gradients are needed at the density's positions only.)
    sparse = {"method": "static", "density_g": 0.1, "density_d": 0.5, "optimizer_state": "masked"}
    static = train_gaussians(tiny(sparse=sparse), tmp_path / "s")
    g_sparse = forward_flops(G_SHAPES, expected_counts(G_SHAPES, 0.1))
    d_sparse = forward_flops(D_SHAPES, expected_counts(D_SHAPES, 0.5))
    expected = (4 * g_sparse + 9 * d_sparse) / (4 * forward_flops(G_SHAPES) + 9 * forward_flops(D_SHAPES))
    assert static["train_flops_vs_dense"] == pytest.approx(expected, rel=1e-12)
    # In dense mode (the authors') Adam steps every weight, so every weight gradient is computed: a dense forward's
    # worth per backward, 3 F_G + W_G + 6 F_D + 3 W_D per sample.
    authors = train_gaussians(tiny(sparse={**sparse, "optimizer_state": "dense"}), tmp_path / "a")
    g_dense, d_dense = forward_flops(G_SHAPES), forward_flops(D_SHAPES)
    expected = (3 * g_sparse + g_dense + 6 * d_sparse + 3 * d_dense) / (4 * g_dense + 9 * d_dense)
    assert authors["train_flops_vs_dense"] == pytest.approx(expected, rel=1e-12)
    assert static["train_flops_vs_dense"] < authors["train_flops_vs_dense"] < 1.0

    dense = train_gaussians(tiny(), tmp_path / "d")
    assert dense["train_flops_vs_dense"] == 1.0 and dense["density_g"] == dense["density_d"] == 1.0
    assert dense["layers"] == {}
    # GMP trains dense until it prunes (here at step 18 = gmp_end * 30) to the same final densities: it costs more.
    gmp = train_gaussians(tiny(sparse={"method": "gmp", "density_g": 0.1, "density_d": 0.5}), tmp_path / "g")
    assert gmp["density_g"] == pytest.approx(static["density_g"], abs=0.01)
    assert static["train_flops_vs_dense"] < gmp["train_flops_vs_dense"] < 1.0


def test_snip_prunes_at_its_first_step(tmp_path: Path) -> None:
    result = train_gaussians(tiny(sparse={"method": "snip", "density_g": 0.1, "density_d": 0.5}), tmp_path)
    total_g = sum(math.prod(shape) for shape in G_SHAPES.values())
    total_d = sum(math.prod(shape) for shape in D_SHAPES.values())
    # One global threshold per network: exactly round(density * total) weights survive.
    assert result["density_g"] == round(0.1 * total_g) / total_g
    assert result["density_d"] == round(0.5 * total_d) / total_d
