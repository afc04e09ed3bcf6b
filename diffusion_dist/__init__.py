"""diffusion-dist: distributed training of conditional latent diffusion models."""

__version__ = "0.1.0"
