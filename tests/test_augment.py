"""DiffAugment (train.augment): exact transforms, gradients through them, one global draw sliced over ranks, exact
resume, and a run with it on that differs from one without only through D's inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgtrain import checkpoint
from sgtrain.augment import StepAugment, cutout, translate
from sgtrain.config import ConfigError
from sgtrain.parts import step_generator
from sgtrain.train import train

BOTH = ["translation", "cutout"]


def test_translate_moves_each_image_by_its_own_offset_and_fills_with_zeros() -> None:
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4) + 1  # no zeros in the images
    out = translate(x, torch.tensor([1, 0]), torch.tensor([0, -2]))
    assert torch.equal(out[0, 0, 1:], x[0, 0, :3]) and torch.equal(out[0, 0, 0], torch.zeros(4))  # down one row
    assert torch.equal(out[1, 0, :, :2], x[1, 0, :, 2:]) and torch.equal(out[1, 0, :, 2:], torch.zeros(4, 2))  # left 2
    assert torch.equal(translate(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)), x)
    # Shifted entirely out: all padding.
    assert torch.equal(translate(x, torch.tensor([4, -9]), torch.tensor([0, 0])), torch.zeros_like(x))


def test_cutout_zeroes_one_square_per_image() -> None:
    x = torch.ones(3, 3, 8, 8)
    out = cutout(x, torch.tensor([0, 4, 2]), torch.tensor([0, 4, 1]), 4)
    assert (out == 0).reshape(3, -1).sum(1).tolist() == [3 * 16] * 3
    assert torch.equal(out[1, :, 4:, 4:], torch.zeros(3, 4, 4)) and out[1, :, :4].eq(1).all()
    assert torch.equal(out[2, 0, 2:6, 1:5], torch.zeros(4, 4))


def test_gradients_flow_through_the_augmentation_to_the_kept_pixels() -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    aug = StepAugment(BOTH, step_generator(0, 5, stream=1), global_batch=4, mine=slice(0, 4))
    aug(x).sum().backward()
    kept = x.grad.ne(0).reshape(4, -1).float().mean(1)  # every pixel's gradient is 1 (kept) or 0 (cut or shifted out)
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and (kept > 0.4).all() and (kept < 1).all()


def test_ranks_slice_one_global_draw() -> None:
    """Two ranks' augmentations of their halves equal one process's augmentation of the whole batch, call by call."""
    x = torch.randn(8, 3, 32, 32)
    one = StepAugment(BOTH, step_generator(3, 7, stream=1), global_batch=8, mine=slice(0, 8))
    halves = [
        StepAugment(BOTH, step_generator(3, 7, stream=1), global_batch=8, mine=slice(r * 4, r * 4 + 4)) for r in (0, 1)
    ]
    for _ in range(3):  # the stream advances alike on every rank
        whole = one(x)
        assert torch.equal(torch.cat([h(x[r * 4 : r * 4 + 4]) for r, h in enumerate(halves)]), whole)
    assert not torch.equal(
        one(x), StepAugment(BOTH, step_generator(3, 8, stream=1), global_batch=8, mine=slice(0, 8))(x)
    )


def test_unknown_or_repeated_policies_are_config_errors(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"train\.augment: unknown \['flip'\]"):
        tiny_config(train__augment=["flip"])
    with pytest.raises(ConfigError, match="twice"):
        tiny_config(train__augment=["cutout", "cutout"])


def test_augmented_run_resumes_exactly_and_differs_from_the_plain_one(
    tiny_config, tmp_path: Path, assert_trees_equal
) -> None:
    common = {"train__augment": BOTH, "train__ema_start": 1, "train__d_steps": 2}
    train(tiny_config(tmp_path / "split", train__steps=3, **common))
    train(tiny_config(tmp_path / "split", train__steps=6, **common))
    train(tiny_config(tmp_path / "straight", train__steps=6, **common))
    train(tiny_config(tmp_path / "plain", train__steps=6, train__ema_start=1, train__d_steps=2))
    last = {
        name: checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / name)[-1])
        for name in ("split", "straight", "plain")
    }
    for key in ("step", "position", "G", "D", "ema", "opt_g", "opt_d", "masks"):
        assert_trees_equal(last["split"][key], last["straight"][key], key)
    # Same data order (the augmentation has its own RNG stream), different weights.
    assert last["plain"]["position"] == last["straight"]["position"]
    assert not torch.equal(last["plain"]["D"]["blocks.0.conv1.weight"], last["straight"]["D"]["blocks.0.conv1.weight"])
