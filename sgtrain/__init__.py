"""sgtrain: distributed sparse-to-sparse GAN training (STU-GAN) on Accelerate."""

__version__ = "0.1.0"
