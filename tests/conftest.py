"""Shared fixtures: tiny configs that train in well under a second per step on a CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from sgtrain.config import Config, load_config

TINY = {
    "model.g_ch": 4,
    "model.d_ch": 4,
    "model.dim_z": 20,  # 4 chunks of 5 with hier at 32 px
    "model.shared_dim": 8,
    "train.g_lr_decay_from": None,  # constant rates: a run extended by raising train.steps equals a longer one
    "train.batch_size": 8,
    "train.log_every": 1,
    "train.sample_every": 1000,
    "train.checkpoint_every": 1000,
}


@pytest.fixture(autouse=True, scope="session")
def _shard_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Bundled shards (written on first use by runs of digits.yaml) go to a test cache, not the user's home;
    subprocesses inherit it."""
    os.environ["SGTRAIN_CACHE"] = str(tmp_path_factory.mktemp("sgtrain-cache"))


@pytest.fixture
def tiny_config(tmp_path: Path):
    """``tiny_config(**overrides)`` -> a :class:`Config` with a tiny BigGAN and its run_dir under tmp_path."""

    def make(run_dir: str | Path | None = None, **overrides: Any) -> Config:
        values = dict(TINY)
        values["run_dir"] = str(run_dir or tmp_path / "run")
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        return load_config(None, values)

    return make


def _assert_trees_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_trees_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_trees_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    else:
        assert a == b, where


@pytest.fixture
def assert_trees_equal():
    """``assert_trees_equal(a, b, where="")``: bit-for-bit equality of checkpoint-like trees."""
    return _assert_trees_equal
