"""FLOPs accounting: exact per-layer counts against hand computations, densities, iteration formula, report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sgtrain.config import load_config
from sgtrain.flops import (
    ATTENTION_KEY,
    flops_report,
    format_flops,
    gan_iteration_flops,
    layer_forward_flops,
    network_flops,
)
from sgtrain.models import SelfAttention
from sgtrain.models.build import build_models

TINY = {"model.g_ch": 4, "model.d_ch": 4, "model.dim_z": 20, "model.shared_dim": 8}


class ConvThenLinear(nn.Module):
    """Conv2d 3->4 (k3, pad 1, bias) on 8x8, then global average pool of [4, 2, 2] -> 16 features -> Linear 16->2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(16, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)  # pooling and flatten: not counted
        return self.linear(h)


# Conv: 64 output positions x 4 channels, each a 3*3*3 = 27-long dot product (54 FLOPs) plus 1 bias add.
CONV_FLOPS = 8 * 8 * 4 * (2 * 27 + 1)  # 14080
LINEAR_FLOPS = 2 * 16 * 2  # 64, no bias


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_module_exact_and_per_sample(batch: int) -> None:
    flops = layer_forward_flops(ConvThenLinear(), torch.randn(batch, 3, 8, 8))
    assert flops == {"conv": 14080.0, "linear": 64.0}
    assert flops == {"conv": CONV_FLOPS, "linear": LINEAR_FLOPS}
    assert network_flops(flops) == 14144.0


def test_repeated_calls_add_up_and_unreached_layers_report_zero() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    assert layer_forward_flops(Twice(), torch.randn(5, 4)) == {"fc": 2 * (2 * 4 * 4 + 4), "unused": 0.0}


def test_attention_matmuls_exact() -> None:
    # C = 16 on 8x8: theta/phi have 2 channels, g has 8; HW = 64 queries attend to HW/4 = 16 pooled keys.
    #   theta^T phi: [64, 2] @ [2, 16] -> 2 * 64 * 2 * 16 = 4096
    #   g beta^T:    [8, 16] @ [16, 64] -> 2 * 8 * 16 * 64 = 16384
    attention = SelfAttention(16)
    flops = layer_forward_flops(attention, torch.randn(3, 16, 8, 8))
    assert flops[ATTENTION_KEY] == 4096 + 16384
    # Its 1x1 convs (no bias) are counted as weight layers: 2 * C_in * C_out * 64 positions.
    assert flops["theta"] == flops["phi"] == 2 * 16 * 2 * 64
    assert flops["g"] == 2 * 16 * 8 * 64
    assert flops["o"] == 2 * 8 * 16 * 64

    # Independent check of both counts: torch's own FLOP counter, which sees the bmm's and convs themselves (its mm
    # count also holds spectral norm's power iteration, which we leave out on purpose, so mm is not compared).
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        attention.eval()(torch.randn(1, 16, 8, 8))
    ops = counter.get_flop_counts()["Global"]
    assert ops[torch.ops.aten.bmm] == flops[ATTENTION_KEY]
    assert ops[torch.ops.aten.convolution] == flops["theta"] + flops["phi"] + flops["g"] + flops["o"]


def test_densities_scale_exactly_one_layer_and_attention_stays_dense() -> None:
    layers = {"a": 1000.0, "b": 300.0, ATTENTION_KEY: 50.0}
    assert network_flops(layers) == 1350.0
    assert network_flops(layers, {"a": 0.5}) == 500.0 + 300.0 + 50.0
    assert network_flops(layers, {"b": 0.5}) == 1000.0 + 150.0 + 50.0
    assert network_flops(layers, {"a": 0.0, "b": 0.0}) == 50.0
    with pytest.raises(ValueError, match="always dense"):
        network_flops(layers, {ATTENTION_KEY: 0.5})
    with pytest.raises(ValueError, match=r"a\.weight"):
        network_flops(layers, {"a.weight": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        network_flops(layers, {"a": 1.5})


def test_gan_iteration_formula() -> None:
    # F_G = 10, F_D = 100, B = 2, 3 D steps:
    #   each D step: G forward 10 * 2 = 20, D fwd+bwd on 4 images 3 * 100 * 4 = 1200 -> 1220; x3 = 3660
    #   G step: 3 * 10 * 2 + 3 * 100 * 2 = 660
    flops = gan_iteration_flops(10.0, 100.0, batch_size=2, d_steps=3)
    assert flops == {"d_steps": 3660.0, "g_step": 660.0, "total": 4320.0}
    assert gan_iteration_flops(10.0, 100.0, batch_size=2, d_steps=0)["total"] == 660.0


def test_cifar10_generator_counts_and_restores_modes() -> None:
    cifar = load_config("cifar10.yaml")
    generator, _ = build_models(cifar.model, cifar.seed)
    generator.train()
    generator.blocks[1].bn1.eval()  # a mixed state must come back as it was, not as "all train"
    state = {k: v.clone() for k, v in generator.state_dict().items()}
    z, y = torch.randn(2, 128), torch.tensor([3, 7])
    flops = layer_forward_flops(generator, z, y)

    assert generator.training and generator.blocks[0].conv1.training and generator.output_bn.training
    assert not generator.blocks[1].bn1.training and not generator.blocks[1].bn1.bn.training
    # Counting runs in eval mode: no BN statistics or spectral-norm vectors move.
    assert all(torch.equal(state[k], v) for k, v in generator.state_dict().items())

    # Hand computation: CIFAR-10 G has ch 64, so every block is 256 -> 256; block 0 upsamples 4x4 to 8x8.
    assert flops["blocks.0.conv1"] == 2 * 256 * 3 * 3 * 256 * 8 * 8 + 256 * 8 * 8  # 75,513,856
    assert flops["blocks.0.conv1"] == 75_513_856
    assert flops["output_conv"] == 2 * 256 * 3 * 3 * 3 * 32 * 32 + 3 * 32 * 32  # 256 -> 3 at 32x32
    assert flops["linear"] == 2 * 128 * 256 * 4 * 4 + 256 * 4 * 4  # z -> 256 x 4 x 4
    # shared_dim 0: the ccbn gains are per-class embeddings, no Linear; no attention in this config.
    assert set(flops) == {"linear", "output_conv"} | {
        f"blocks.{i}.{conv}" for i in range(3) for conv in ("conv1", "conv2", "conv_sc")
    }
    total = network_flops(flops)
    assert total == sum(flops.values())
    # By hand, per block (conv1 + conv2 + 1x1 shortcut) at 8, 16, 32 px: 159,432,704 x (1, 4, 16), plus the linear
    # 1,052,672 and the output conv 14,158,848.
    assert total == 159_432_704 * (1 + 4 + 16) + 1_052_672 + 14_158_848 == 3_363_298_304

    # Independent check of all convs together: torch's counter counts conv multiply-adds without the bias adds.
    bias_adds = sum(m.out_channels * positions for m, positions in _conv_output_positions(generator, z, y))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        generator.eval()(z, y)
    conv_total = sum(v for k, v in flops.items() if k != "linear")
    assert counter.get_flop_counts()["Global"][torch.ops.aten.convolution] / len(z) == conv_total - bias_adds


def _conv_output_positions(module: nn.Module, *inputs: torch.Tensor) -> list[tuple[nn.Conv2d, float]]:
    """(conv, H_out * W_out) for every biased conv call in one forward."""
    seen: list[tuple[nn.Conv2d, float]] = []
    hooks = [
        m.register_forward_hook(lambda m, _i, out: seen.append((m, out[0, 0].numel())))
        for m in module.modules()
        if isinstance(m, nn.Conv2d) and m.bias is not None
    ]
    with torch.no_grad():
        module.eval()(*inputs)
    for hook in hooks:
        hook.remove()
    return seen


def test_flops_report_tiny_is_json_and_sparse_is_cheaper() -> None:
    cfg = load_config(None, TINY)
    generator, discriminator = build_models(cfg.model, cfg.seed)
    m = cfg.model
    kwargs = dict(resolution=m.resolution, n_classes=m.n_classes, dim_z=m.dim_z, batch_size=8, d_steps=2)
    dense = flops_report(generator, discriminator, **kwargs)
    g_layers, d_layers = dense["G"]["layers"], dense["D"]["layers"]
    # hier with a shared embedding: the ccbn gains and biases are bias-free Linears and are counted.
    assert "blocks.0.bn1.gain" in g_layers and "blocks.0.conv1" in d_layers

    g_densities = {name: 0.3 for name in g_layers}
    d_densities = {name: 0.5 for name in d_layers}
    report = flops_report(generator, discriminator, **kwargs, g_densities=g_densities, d_densities=d_densities)
    report = json.loads(json.dumps(report))  # JSON-serialisable, and the round trip keeps every number

    g, d, train = report["G"], report["D"], report["train_iteration"]
    assert g["inference_dense"] == dense["G"]["inference_dense"] == pytest.approx(sum(g_layers.values()))
    assert g["inference_sparse"] == pytest.approx(0.3 * g["inference_dense"])
    assert d["inference_sparse"] == pytest.approx(0.5 * d["inference_dense"])
    assert train["sparse"] < train["dense"] == dense["train_iteration"]["dense"]
    expected = gan_iteration_flops(g["inference_dense"], d["inference_dense"], batch_size=8, d_steps=2)["total"]
    assert train["dense"] == expected
    assert train["sparse_fraction"] == pytest.approx(train["sparse"] / train["dense"])
    assert dense["train_iteration"]["sparse_fraction"] == 1.0


@pytest.mark.parametrize(
    ("flops", "text"),
    [
        (1.234e9, "1.23 GFLOPs"),
        (456.7e6, "456.7 MFLOPs"),
        (12.04e12, "12.0 TFLOPs"),
        (999.96e6, "1.00 GFLOPs"),
        (512.0, "512.0 FLOPs"),
        (0.0, "0.00 FLOPs"),
    ],
)
def test_format_flops(flops: float, text: str) -> None:
    assert format_flops(flops) == text
