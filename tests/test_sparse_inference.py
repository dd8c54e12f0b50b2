"""Sparse inference: compiled generators equal the dense eval generator; the per-layer choice is recorded."""

from __future__ import annotations

import pytest
import torch

from sgtrain.parts import build_training
from sgtrain.sparse_inference import DenseConv2d, SparseConv2d, SparseLinear, compile_sparse


def _sparse_generator(tiny_config, density: float) -> torch.nn.Module:
    cfg = tiny_config(sparse__method="static", sparse__density_g=density, sparse__density_d=1.0)
    G, _, _, _, masks = build_training(cfg)
    masks.initialize()
    return G.eval()


@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.parametrize("batch", [1, 4])
def test_forced_sparse_equals_dense(tiny_config, density, batch):
    G = _sparse_generator(tiny_config, density)
    compiled = compile_sparse(G, batch_size=batch, force="sparse", max_density=1.0)
    sparse = [c for c in compiled.sparse_plan if c.choice == "sparse"]
    # Every conv is stride 1 and every linear eligible: with max_density 1 all of them run sparse.
    assert len(sparse) == len(compiled.sparse_plan) > 0
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(batch, G.dim_z, generator=generator)
    y = torch.randint(G.n_classes, (batch,), generator=generator)
    with torch.no_grad():
        expected = G(z, y)
        # Twice: a forward must leave the compiled layers' state (e.g. their biases) untouched.
        for _ in range(2):
            assert (compiled(z, y) - expected).abs().max() <= 1e-4
        # Frozen spectral norm must not touch G: two eval forwards of G still agree bit for bit.
        assert torch.equal(G(z, y), G(z, y))


def test_choice_recorded_and_dense_layer_stays_dense(tiny_config):
    G = _sparse_generator(tiny_config, 0.1)
    compiled = compile_sparse(G, batch_size=2, repeats=1)
    plan = {c.name: c for c in compiled.sparse_plan}
    modules = dict(compiled.named_modules())
    # The masked conv weights of blocks.0.conv1 are timed both ways and the faster kernel is the one installed.
    conv = plan["blocks.0.conv1"]
    assert conv.eligible and conv.dense_s is not None and conv.sparse_s is not None
    assert conv.choice == ("sparse" if conv.sparse_s < conv.dense_s else "dense")
    assert isinstance(modules["blocks.0.conv1"], SparseConv2d if conv.choice == "sparse" else DenseConv2d)
    assert conv.input_shape == (2, 16, 8, 8) and 0 < conv.density < 0.5
    # The ccbn gain projections are never masked: density 1, not eligible, dense even when sparse is forced.
    forced = compile_sparse(G, batch_size=2, force="sparse")
    forced_plan = {c.name: c for c in forced.sparse_plan}
    gain = forced_plan["blocks.0.bn1.gain"]
    assert gain.density == 1.0 and not gain.eligible and gain.choice == "dense" and gain.dense_s is None
    assert not isinstance(dict(forced.named_modules())["blocks.0.bn1.gain"], SparseLinear)


def test_needs_eval_mode(tiny_config):
    G = _sparse_generator(tiny_config, 0.5).train()
    with pytest.raises(ValueError, match="eval"):
        compile_sparse(G, batch_size=1)
