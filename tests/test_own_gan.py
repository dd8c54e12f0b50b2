"""Bring your own GAN: ``model.builder`` (sgtrain/examples/dcgan.py) is built, masked, and trained by the same loop
as BigGAN, with the same guarantees: N ranks equal one process with the same global batch, a stop and resume equals
an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from multiprocess import assert_all_succeeded, run_ranks
from stops import StopAfter
from torch import nn

from sgtrain import checkpoint
from sgtrain.config import ConfigError, config_from_dict, config_to_dict
from sgtrain.examples import dcgan
from sgtrain.parts import build_training
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.topology import pack_mask
from sgtrain.stopping import StoppedEarly
from sgtrain.train import train

BUILDER = "sgtrain.examples.dcgan:build"
OWN = {"model__builder": BUILDER, "model__g_ch": 2, "model__d_ch": 2, "model__dim_z": 8}
STU = {"sparse__method": "stu", "sparse__density_g": 0.3, "sparse__density_d": 0.5}


def _last_state(run_dir: str | Path) -> dict[str, Any]:
    return checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])


# --------------------------------------------------------------------------------------------------------------------
# The builder is used, and its weights are masked.


@pytest.mark.parametrize("targets", ["conv_only", "conv_linear"])
def test_the_builder_is_used_and_its_weights_are_masked_at_the_configured_density(tiny_config, targets: str) -> None:
    cfg = tiny_config(**OWN, **STU, sparse__targets=targets)
    G, D, _, _, masks = build_training(cfg)
    assert type(G) is dcgan.Generator and type(D) is dcgan.Discriminator
    masks.initialize()
    kinds = (nn.Conv2d, nn.Linear) if targets == "conv_linear" else (nn.Conv2d,)
    for net, module, density in (("G", G, 0.3), ("D", D, 0.5)):
        layers = masks.layers[net]
        expected_names = [name for name, m in module.named_modules() if isinstance(m, kinds)]
        assert [layer.name for layer in layers] == expected_names
        assert any(isinstance(module.get_submodule(layer.name), nn.Linear) for layer in layers) == (
            targets == "conv_linear"
        )
        # The counts of the ERK distribution, computed here from the shapes alone.
        shapes = {layer.name: tuple(layer.param.shape) for layer in layers}
        counts = active_counts(shapes, layer_densities(shapes, density, kind="ERK"))
        for layer in layers:
            assert int(layer.mask.sum()) == layer.count == counts[layer.name], f"{net}.{layer.name}"
            assert not layer.param[~layer.mask].any(), f"{net}.{layer.name}: inactive weights are not zero"
            assert layer.param is module.get_submodule(layer.name).weight  # the live weight, not a copy
        total = sum(layer.numel for layer in layers)
        assert abs(sum(counts.values()) - density * total) <= len(layers)  # rounding: at most one weight per layer
        assert min(layer.density for layer in layers) < density  # not all dense: the masks mean something


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sgtrain.examples.dcgan", "must be package.module:function"),
        ("sgtrain.examples.no_such_module:build", "cannot import sgtrain.examples.no_such_module"),
        ("sgtrain.examples.dcgan:no_such_function", "sgtrain.examples.dcgan has no function no_such_function"),
    ],
)
def test_a_bad_builder_is_a_config_error_naming_what_is_wrong(tiny_config, spec: str, message: str) -> None:
    cfg = tiny_config(model__builder=spec, train__steps=1)
    with pytest.raises(ConfigError, match=message) as raised:
        train(cfg)
    assert spec in str(raised.value) and "\n" not in str(raised.value)  # one line that names the value given
    assert not checkpoint.list_checkpoints(cfg.run_dir)


# --------------------------------------------------------------------------------------------------------------------
# Two ranks equal one process; a stop and resume equals an uninterrupted run.


def _train_rank(_rank: int, cfg_dict: dict[str, Any]) -> None:
    from sgtrain.dist import Dist
    from sgtrain.train import training_loop

    dist = Dist()
    try:
        training_loop(config_from_dict(cfg_dict), dist)
    finally:
        dist.shutdown()


def test_two_ranks_and_a_resumed_run_equal_one_uninterrupted_process(
    tiny_config, tmp_path: Path, assert_trees_equal
) -> None:
    # Six G steps, G's and D's topologies updated every 2 G steps, the EMA averaging from the start.
    # Adam's eps is 1e-4 as in test_distributed.py: the biases of G's convs feed batch norm, so their true gradient
    # is zero and what they get is summation noise, which eps 1e-6 would amplify past any fp32 tolerance.
    common = {
        **OWN,
        **STU,
        "sparse__explore": "GD",
        "sparse__update_every": 2,
        "train__steps": 6,
        "train__d_steps": 2,
        "train__batch_size": 8,
        "train__ema_start": 0,
        "train__ema_decay": 0.9,
        "train__adam_eps": 1e-4,
    }
    straight = tiny_config(tmp_path / "straight", **common)
    train(straight)
    reference = _last_state(straight.run_dir)
    assert reference["step"] == 6
    final = {key: entry["mask"] for key, entry in reference["masks"]["layers"].items()}
    *_, start = build_training(straight)
    start.initialize()  # the masks of step 0
    initial = {f"{layer.net}.{layer.name}": pack_mask(layer.mask) for layer in start._all_layers()}
    assert initial.keys() == final.keys()
    for net in ("G", "D"):  # both topologies were explored: the updates did something
        assert any(not torch.equal(initial[k], final[k]) for k in final if k.startswith(f"{net}.")), net

    # Stopped after step 3 (between two topology updates), then resumed to step 6: bit-identical. A stop request,
    # not a shorter train.steps: STU's drop-fraction schedule is a function of train.steps.
    split = tiny_config(tmp_path / "split", **common)
    with pytest.raises(StoppedEarly):
        train(split, stop=StopAfter(3))
    assert [p.name for p in checkpoint.list_checkpoints(split.run_dir)] == ["step-00000003.pt"]
    train(split)
    resumed = _last_state(split.run_dir)
    for key in ("step", "position", "flops", "G", "D", "ema", "opt_g", "opt_d", "masks", "rng"):
        assert_trees_equal(resumed[key], reference[key], key)

    # Two gloo ranks of 4 images each (DDP, cross-replica BN): the same run up to fp32 summation order.
    two = tiny_config(tmp_path / "two", **common)
    assert_all_succeeded(run_ranks(_train_rank, config_to_dict(two)))
    other = _last_state(two.run_dir)
    assert other["step"] == 6 and other["position"] == reference["position"]
    for net in ("G", "D", "ema"):
        for name, x in reference[net].items():
            y = other[net][name]
            if x.is_floating_point():
                torch.testing.assert_close(y, x, rtol=1e-4, atol=5e-5, msg=lambda m, n=f"{net}.{name}": f"{n}: {m}")
            else:
                assert torch.equal(x, y), f"{net}.{name}"
    for key, mask in final.items():
        assert torch.equal(other["masks"]["layers"][key]["mask"], mask), key
