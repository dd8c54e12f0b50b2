"""Sampling a run's EMA generator: pure latents per sample index, truncation, standing statistics, the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sgtrain.generators import load_generator
from sgtrain.sampling import generate, latents, rank_indices, standing_statistics, truncated_normal
from sgtrain.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgtrain.config import load_config

    values = {"model.g_ch": 4, "model.d_ch": 4, "model.dim_z": 20, "model.shared_dim": 8, "train.batch_size": 8}
    values.update({"train.steps": 2, "run_dir": str(tmp_path_factory.mktemp("run"))})
    return train(load_config(None, values))


def test_latents_are_a_pure_function_of_the_sample_index() -> None:
    z, y = latents(range(10), dim_z=6, n_classes=10, seed=3)
    parts = [latents(part, dim_z=6, n_classes=10, seed=3) for part in ([0, 1, 2], range(3, 10))]
    assert torch.equal(torch.cat([p[0] for p in parts]), z) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(latents(range(10), dim_z=6, n_classes=10, seed=4)[0], z)


def test_truncation_resamples_values_outside_the_threshold() -> None:
    z = truncated_normal((4000,), 0.5, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5 and z.std() > 0.25  # not a rescaled normal squeezed into the interval
    assert torch.equal(
        truncated_normal((5,), None, torch.Generator().manual_seed(1)),
        torch.randn(5, generator=torch.Generator().manual_seed(1)),
    )


def test_ranks_generate_the_same_images_as_one_process(run_dir: Path) -> None:
    loaded = load_generator(run_dir)
    m = loaded.cfg.model
    options = {"dim_z": m.dim_z, "n_classes": m.n_classes, "seed": 0, "truncation": 1.0, "batch_size": 4}
    whole, classes = generate(loaded.module, list(range(10)), **options)
    parts = [generate(loaded.module, rank_indices(10, rank, 3), **options) for rank in range(3)]
    assert [len(rank_indices(10, rank, 3)) for rank in range(3)] == [4, 4, 2]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([p[1] for p in parts]), classes)


def test_standing_statistics_replace_the_running_averages(run_dir: Path) -> None:
    loaded = load_generator(run_dir)
    before = loaded.module.output_bn.running_mean.clone()
    standing_statistics(loaded, batches=2, batch_size=8)
    assert not torch.equal(loaded.module.output_bn.running_mean, before)
    assert not loaded.module.training and loaded.mode.startswith("standing statistics")
    assert loaded.module.output_bn.momentum == 0.1  # restored


def test_sample_command_writes_a_grid_and_states_what_it_sampled(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    command = [sys.executable, "-m", "sgtrain", "sample", str(run_dir), "--out", str(out)]
    result = subprocess.run([*command, "--classes", "1,3,5", "--truncation", "0.5"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "3 classes x 8 samples" in result.stdout and "eval mode (running statistics), truncation 0.5" in result.stdout
    )
    assert Image.open(out).size == (8 * 34 + 2, 3 * 34 + 2)  # 32 px images with 2 px gaps
    bad = subprocess.run([*command, "--classes", "12"], capture_output=True, text=True)
    assert bad.returncode == 2 and "classes [12] are out of range" in bad.stderr
