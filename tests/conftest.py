"""Shared fixtures: tiny configs that train in well under a second per step on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sgtrain.config import Config, load_config

TINY = {
    "model.g_ch": 4,
    "model.d_ch": 4,
    "model.dim_z": 20,  # 4 chunks of 5 with hier at 32 px
    "model.shared_dim": 8,
    "train.batch_size": 8,
    "train.log_every": 1,
    "train.sample_every": 1000,
    "train.checkpoint_every": 1000,
}


@pytest.fixture
def tiny_config(tmp_path: Path):
    """``tiny_config(**overrides)`` -> a :class:`Config` with a tiny BigGAN and its run_dir under tmp_path."""

    def make(run_dir: str | Path | None = None, **overrides: Any) -> Config:
        values = dict(TINY)
        values["run_dir"] = str(run_dir or tmp_path / "run")
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        return load_config(None, values)

    return make
