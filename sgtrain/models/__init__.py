"""BigGAN generator and discriminator, and the spectrally normalised layers they are built from."""

from sgtrain.models.biggan import Discriminator, Generator, count_parameters, init_weights
from sgtrain.models.layers import (
    ConditionalBatchNorm2d,
    SelfAttention,
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNormMixin,
)

__all__ = [
    "ConditionalBatchNorm2d",
    "Discriminator",
    "Generator",
    "SNConv2d",
    "SNEmbedding",
    "SNLinear",
    "SelfAttention",
    "SpectralNormMixin",
    "count_parameters",
    "init_weights",
]
