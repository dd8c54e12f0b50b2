"""BigGAN models: exact parameter counts, shapes, conditioning, spectral norm, init and autocast."""

import copy

import pytest
import torch

from sgtrain.models import (
    ConditionalBatchNorm2d,
    Discriminator,
    Generator,
    SelfAttention,
    SNConv2d,
    SNEmbedding,
    SNLinear,
    count_parameters,
)

CIFAR10_D = dict(resolution=32, n_classes=10, ch=64, attn_res=[], init="N02")
CIFAR10_G = dict(CIFAR10_D, dim_z=128, shared_dim=0, hier=False)
# The imagenet128 configs use ortho; init does not change the count, and N02 builds the 128 px pair in ~2 s
# where ortho's QR decompositions take ~9 s.
IMAGENET128_D = dict(resolution=128, n_classes=1000, ch=96, attn_res=[64], init="N02")
IMAGENET128_G = dict(IMAGENET128_D, dim_z=120, shared_dim=128, hier=True)


TINY_D = dict(n_classes=5, ch=8, attn_res=[], init="ortho")
TINY_G = dict(TINY_D, dim_z=60, shared_dim=16, hier=True)  # 60 splits into 4, 5 or 6 chunks


def tiny_g(resolution: int = 32, **overrides) -> Generator:
    return Generator(**{**TINY_G, "resolution": resolution, **overrides})


def tiny_d(resolution: int = 32, **overrides) -> Discriminator:
    return Discriminator(**{**TINY_D, "resolution": resolution, **overrides})


def top_singular_value(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1).double(), ord=2).item()


# Parameter counts.


def test_cifar10_parameter_counts_are_exact():
    assert count_parameters(Generator(**CIFAR10_G)) == 4_304_387
    assert count_parameters(Discriminator(**CIFAR10_D)) == 4_207_361


def test_imagenet128_parameter_counts_match_the_paper():
    g = count_parameters(Generator(**IMAGENET128_G))
    d = count_parameters(Discriminator(**IMAGENET128_D))
    assert g == 70_433_988 and abs(g / 70.43e6 - 1) < 1e-3
    assert d == 87_982_370 and abs(d / 87.98e6 - 1) < 1e-3


def test_count_parameters_excludes_buffers():
    layer = SNLinear(3, 4)
    assert count_parameters(layer) == 3 * 4 + 4
    assert {name for name, _ in layer.named_buffers()} == {"u", "sv"}


# Shapes and conditioning.


@pytest.mark.parametrize("attn", [False, True])
@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize(("shared_dim", "hier"), [(16, True), (16, False), (0, False)])
def test_output_shapes(resolution, attn, shared_dim, hier):
    attn = [resolution // 2] if attn else []  # a side both G and D have
    torch.manual_seed(0)
    g = tiny_g(resolution, attn_res=attn, shared_dim=shared_dim, hier=hier)
    d = tiny_d(resolution, attn_res=attn)
    assert len(g.attention) == len(d.attention) == len(attn)
    z, y = torch.randn(2, 60), torch.tensor([0, 3])
    x = g(z, y)
    assert x.shape == (2, 3, resolution, resolution)
    assert x.abs().max() <= 1
    assert d(x, y).shape == (2,)


@pytest.mark.parametrize(("shared_dim", "hier"), [(16, True), (16, False), (0, False)])
def test_generator_output_depends_on_class(shared_dim, hier):
    torch.manual_seed(0)
    g = tiny_g(shared_dim=shared_dim, hier=hier).eval()  # eval BN: no coupling between samples of a batch
    z = torch.randn(1, 60).repeat(2, 1)
    x = g(z, torch.tensor([0, 1]))
    assert (x[0] - x[1]).abs().max() > 1e-3


def test_discriminator_output_depends_on_class():
    torch.manual_seed(0)
    d = tiny_d()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out0, out1 = d(x, torch.zeros(4, dtype=torch.long)), d(x, torch.ones(4, dtype=torch.long))
    assert (out0 - out1).abs().min() > 1e-4


def test_grey_generator_draws_one_channel_repeated_over_rgb():
    torch.manual_seed(0)
    rgb, grey = tiny_g(), tiny_g(grey=True)
    assert grey.output_conv.weight.shape[0] == 1 and rgb.output_conv.weight.shape[0] == 3
    assert count_parameters(rgb) - count_parameters(grey) == 2 * (8 * 4 * 3 * 3 + 1)  # two output channels fewer
    x = grey(torch.randn(4, 60), torch.arange(4))
    assert x.shape == (4, 3, 32, 32) and x.std() > 0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    x.sum().backward()  # the repeated channel's gradient reaches the one-channel convolution
    assert grey.output_conv.weight.grad.abs().sum() > 0


def test_hier_splits_z_into_one_chunk_per_block_plus_one():
    g = tiny_g(128)  # 5 blocks -> 6 chunks of 10
    assert g.z_chunk == 10 and g.linear.in_features == 10
    assert g.blocks[0].bn1.gain.in_features == 16 + 10


def test_discriminator_survives_two_forwards_before_backward():
    # The usual D step runs D on fakes and reals and then backpropagates once; the SN update of the second
    # forward must not invalidate tensors saved by the first.
    torch.manual_seed(0)
    d = tiny_d()
    y = torch.tensor([0, 1])
    loss = d(torch.randn(2, 3, 32, 32), y).sum() + d(torch.randn(2, 3, 32, 32), y).sum()
    loss.backward()
    assert d.blocks[0].conv1.weight.grad is not None


# Spectral norm.


@pytest.mark.parametrize(
    "make", [lambda: SNLinear(20, 30), lambda: SNConv2d(6, 10, 3, padding=1), lambda: SNEmbedding(12, 7)]
)
def test_spectral_norm_converges_to_unit_sigma(make):
    torch.manual_seed(0)
    layer = make()
    assert isinstance(layer.weight, torch.nn.Parameter) and "weight" in dict(layer.named_parameters())
    assert torch.allclose(layer.u.norm(), torch.tensor(1.0))
    for _ in range(30):
        layer.normalized_weight()
    assert abs(top_singular_value(layer.normalized_weight()) - 1) < 0.05
    assert abs(layer.sv.item() / top_singular_value(layer.weight) - 1) < 0.05


def test_spectral_norm_updates_u_in_training_only():
    torch.manual_seed(0)
    layer = SNConv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    u, sv = layer.u.clone(), layer.sv.clone()
    layer.eval()
    first = layer(x)
    assert torch.equal(layer.u, u) and torch.equal(layer.sv, sv)
    assert torch.equal(layer(x), first)  # eval forwards are deterministic
    layer.train()
    layer(x)
    assert not torch.equal(layer.u, u) and not torch.equal(layer.sv, sv)


def test_spectral_norm_gradient_reaches_raw_weight():
    layer = SNLinear(5, 3)
    layer(torch.randn(4, 5)).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_spectral_norm_of_all_zero_weight_is_finite():
    layer = SNLinear(5, 3)
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.isfinite(layer(torch.randn(2, 5))).all()


# Layers.


def test_conditional_batchnorm_needs_exactly_one_conditioning():
    with pytest.raises(ValueError):
        ConditionalBatchNorm2d(4)
    with pytest.raises(ValueError):
        ConditionalBatchNorm2d(4, cond_dim=3, n_classes=5)


def test_conditional_batchnorm_with_zero_tables_is_plain_batchnorm():
    bn = ConditionalBatchNorm2d(4, n_classes=3)
    torch.nn.init.zeros_(bn.gain.weight)
    torch.nn.init.zeros_(bn.bias.weight)
    x = torch.randn(6, 4, 3, 3)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    assert torch.allclose(bn(x, torch.tensor([0, 1, 2, 0, 1, 2])), expected, atol=1e-5)


def test_self_attention_is_identity_at_init():
    attn = SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    assert attn.gamma.item() == 0 and torch.equal(attn(x), x)
    assert attn.theta.out_channels == attn.phi.out_channels == 2 and attn.g.out_channels == 8


# Init and validation.


def test_same_seed_gives_identical_weights():
    states = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        states.append({**tiny_g(attn_res=[16]).state_dict(), **tiny_d().state_dict()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize("init", ["ortho", "N02", "xavier"])
def test_init_styles(init):
    torch.manual_seed(0)
    g, d = tiny_g(init=init), tiny_d(init=init)
    w = d.blocks[1].conv2.weight.detach().reshape(32, -1)  # [32, 288]
    if init == "ortho":
        assert torch.allclose(w @ w.t(), torch.eye(32), atol=1e-5)
    elif init == "N02":
        assert abs(w.std().item() - 0.02) < 0.002
    else:
        bound = (6 / (32 * 9 + 32 * 9)) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.isfinite(g(torch.randn(2, 60), torch.tensor([0, 1]))).all()


@pytest.mark.parametrize(
    "bad",
    [
        lambda: tiny_g(init="kaiming"),
        lambda: tiny_d(init="orthogonal"),
        lambda: tiny_g(resolution=256),
        lambda: tiny_d(resolution=48),
        lambda: tiny_g(dim_z=25),  # 32 px: 3 blocks -> 4 chunks
        lambda: tiny_g(shared_dim=0, hier=True),
        lambda: tiny_g(attn_res=[4]),
        lambda: tiny_d(attn_res=[32]),
    ],
)
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        bad()


# Mixed precision.


def test_models_run_under_bf16_autocast():
    torch.manual_seed(0)
    g, d = tiny_g(attn_res=[16]), tiny_d(attn_res=[16])
    z, y = torch.randn(2, 60), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = g(z, y)
        out = d(x, y)
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all() and x.abs().max() <= 1
    assert out.shape == (2,) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert g.blocks[0].conv1.weight.grad.dtype == torch.float32


def test_sigma_is_computed_in_float32_under_autocast():
    torch.manual_seed(0)
    layer = SNConv2d(16, 32, 3, padding=1)
    reference = copy.deepcopy(layer)
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    reference(x)
    assert out.dtype == torch.bfloat16  # autocast was active for the convolution itself
    assert layer.u.dtype == layer.sv.dtype == torch.float32
    # Bit-identical to the fp32 iteration: a bf16 matmul anywhere in it would round differently.
    assert torch.equal(layer.u, reference.u) and torch.equal(layer.sv, reference.sv)
