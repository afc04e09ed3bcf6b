"""A time-conditioned classifier p_φ(c | z_t, t) on noisy latents, for classifier guidance.

ADM's encoder-half UNet (Dhariwal & Nichol 2021, Sec. 4 and App. B): the UNet's down path and
middle block at the same named size, conditioned on the timestep only, then GroupNorm-SiLU,
global average pooling and a linear layer to logits (ADM's "adaptive" pooling head, which
works at any latent size).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .unet import UNET_SIZES, AttentionBlock, ResBlock, Stage, UNetSize, encoder_stages, group_norm, timestep_embedding


class NoisyClassifier(nn.Module):
    """logits_φ(z_t, t): (N, C, H, W) noisy latents and (N,) training timesteps -> (N, num_classes)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        size: UNetSize,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.gradient_checkpointing = gradient_checkpointing
        ch = size.model_channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, skip_channels = encoder_stages(size, emb_dim, dropout)
        channels = skip_channels[-1]
        self.middle = Stage(
            ResBlock(channels, channels, emb_dim, dropout),
            AttentionBlock(channels, size.num_head_channels),
            ResBlock(channels, channels, emb_dim, dropout),
        )
        self.head = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )
        self.levels = len(size.channel_mult)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if z_t.shape[-1] % 2 ** (self.levels - 1) or z_t.shape[-2] % 2 ** (self.levels - 1):
            raise ValueError(f"latent size {tuple(z_t.shape[-2:])} must be divisible by {2 ** (self.levels - 1)}")
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features).to(z_t.dtype))
        h = self.input_conv(z_t)
        for stage in [*self.down, self.middle]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(stage, h, emb, use_reentrant=False)
            else:
                h = stage(h, emb)
        return self.head(h)  # (N, num_classes)


def build_classifier(
    size: str, in_channels: int, num_classes: int, dropout: float = 0.0, gradient_checkpointing: bool = False
) -> NoisyClassifier:
    """The noisy-latent classifier of a named size: the encoder half of that UNet size."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(UNET_SIZES)}")
    return NoisyClassifier(in_channels, num_classes, UNET_SIZES[size], dropout, gradient_checkpointing)
