"""Building G and D from the model config: BigGAN, or the user's own pair through ``model.builder``.

Everything that needs the networks (the training setup, sampling, export, inspection, FLOPs) builds them here, so
none of them imports the training loop.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch
from torch import nn

from sgtrain.config import ConfigError, ModelConfig
from sgtrain.models.biggan import Discriminator, Generator

# What ``model.builder`` names: ``builder(model_config) -> (generator, discriminator)``. The generator is called
# ``G(z [B, dim_z], y [B] int64) -> images [B, 3, R, R] in [-1, 1]`` and the discriminator ``D(x, y) -> logits [B]``
# (or ``[B, 1]``); ``y`` may be ignored by an unconditional pair.
Builder = Callable[[ModelConfig], tuple[nn.Module, nn.Module]]


def resolve_builder(spec: str) -> Builder:
    """The function named by ``package.module:function``; a :class:`ConfigError` if it cannot be imported."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"model.builder must be package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"model.builder {spec!r}: cannot import {module_name} ({error})") from None
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ConfigError(f"model.builder {spec!r}: {module_name} has no function {attribute}")
    return builder


def build_models(model: ModelConfig, seed: int, *, weights_follow: bool = False) -> tuple[nn.Module, nn.Module]:
    """G and D of ``model``, initialised from ``seed`` (identical on every rank, since every rank seeds alike).

    ``weights_follow``: the caller loads the weights next (sampling, export, inspection), so the cheap N(0, 0.02)
    init replaces BigGAN's orthogonal one, whose QR decompositions are slow for big models."""
    if weights_follow and model.builder is None:
        model = dataclasses.replace(model, init="N02")
    torch.manual_seed(seed)
    if model.builder is not None:
        generator, discriminator = resolve_builder(model.builder)(model)
        if not (isinstance(generator, nn.Module) and isinstance(discriminator, nn.Module)):
            raise ConfigError(f"model.builder {model.builder!r} must return (generator, discriminator) modules")
        return generator, discriminator
    generator = Generator(
        resolution=model.resolution,
        n_classes=model.n_classes,
        ch=model.g_ch,
        dim_z=model.dim_z,
        shared_dim=model.shared_dim,
        hier=model.hier,
        attn_res=model.g_attn,
        init=model.init,
        bn_eps=model.bn_eps,
        sn_eps=model.sn_eps,
        grey=model.grey,
    )
    discriminator = Discriminator(
        resolution=model.resolution,
        n_classes=model.n_classes,
        ch=model.d_ch,
        attn_res=model.d_attn,
        init=model.init,
        sn_eps=model.sn_eps,
    )
    return generator, discriminator
