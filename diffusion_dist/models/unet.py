"""Class-conditional UNet for ε-prediction on latents, in the lineage of ADM (Dhariwal & Nichol 2021).

Residual blocks take the timestep embedding plus a class embedding through scale-shift
GroupNorm (AdaGN); self-attention at chosen resolutions uses torch's scaled_dot_product_attention.
The class table has num_classes + 1 rows; the last, index num_classes, is the null token ∅
for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetSize:
    """Architecture hyperparameters of a named size."""

    model_channels: int  # channels at the first level
    channel_mult: tuple[int, ...]  # channels per level = model_channels * mult; one level per entry
    num_res_blocks: int  # residual blocks per level on the way down (one more on the way up)
    attention_ds: tuple[int, ...]  # downsampling factors (1, 2, 4, ...) that get self-attention
    num_head_channels: int = 64  # channels per attention head


# Named sizes. Parameter counts and GFLOPs per sample at 4×32×32 are in README.md
# (benchmarks/model_sizes.py prints them); UNet-XL is near DiT-XL/2's compute.
UNET_SIZES: dict[str, UNetSize] = {
    "UNet-T": UNetSize(32, (1, 2), 1, (2,), num_head_channels=32),
    "UNet-S": UNetSize(64, (1, 2, 2), 2, (2, 4)),
    "UNet-B": UNetSize(192, (1, 2, 2), 2, (2, 4)),
    "UNet-L": UNetSize(256, (1, 2, 4), 2, (2, 4)),
    "UNet-XL": UNetSize(384, (1, 2, 4), 3, (2, 4)),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017): (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer for narrow layers), computed in float32 for stability."""
    return GroupNorm32(min(32, channels), channels)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even when DeepSpeed has cast the model (and these weights) to bf16/fp16.
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (ADM, Sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the conditioning embedding enters as AdaGN scale and shift."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (N, C_out, H, W)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)  # each (N, C_out, 1, 1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class TokenLinear(nn.Conv2d):
    """ADM's 1×1 convolution (same parameters, same checkpoints) applied to (N, L, C) tokens as a
    linear map: a GEMM, faster than a 1×1 convolution on CPUs, with its output's channels last."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, with a residual connection.

    q, k and v come out of the projection with a contiguous head dimension, which fused (flash)
    attention kernels need: without one SDPA falls back to its math path, which materialises
    the (H·W)² attention matrix.
    """

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = group_norm(channels)
        self.qkv = TokenLinear(channels, 3 * channels)
        self.proj = zero_init(TokenLinear(channels, channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, H·W, C)
        qkv = self.qkv(tokens).reshape(n, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, H·W, C / heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        return x + self.proj(out).transpose(1, 2).reshape(n, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)  # (N, C, H / 2, W / 2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (N, C, 2H, 2W)


class Stage(nn.Module):
    """A run of layers that share the conditioning embedding, checkpointed as one unit."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, emb)
        return x


def encoder_stages(size: UNetSize, emb_dim: int, dropout: float) -> tuple[nn.ModuleList, list[int]]:
    """The down path of a named size, shared by the UNet and the noisy classifier (ADM's encoder half).

    Returns the stages and the channels of every skip connection, input convolution first;
    the last entry is the width at the lowest resolution.
    """
    ch = size.model_channels
    stages, skip_channels = nn.ModuleList(), [ch]
    channels, ds = ch, 1
    for level, mult in enumerate(size.channel_mult):
        for _ in range(size.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(channels, mult * ch, emb_dim, dropout)]
            channels = mult * ch
            if ds in size.attention_ds:
                layers.append(AttentionBlock(channels, size.num_head_channels))
            stages.append(Stage(*layers))
            skip_channels.append(channels)
        if level != len(size.channel_mult) - 1:
            stages.append(Stage(Downsample(channels)))
            skip_channels.append(channels)
            ds *= 2
    return stages, skip_channels


class UNet(nn.Module):
    """ε_θ(z_t, t, c): (N, C, H, W) latents -> (N, C or 2C, H, W); H and W divisible by 2^(levels−1)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        size: UNetSize,
        learn_sigma: bool = False,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.null_label = num_classes  # last row of the class table
        self.gradient_checkpointing = gradient_checkpointing
        ch = size.model_channels
        emb_dim = 4 * ch

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, size.num_head_channels)

        # Encoder: every stage's output is kept as a skip connection for the decoder.
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, skip_channels = encoder_stages(size, emb_dim, dropout)
        channels, ds = skip_channels[-1], 2 ** (len(size.channel_mult) - 1)
        self.middle = Stage(res(channels, channels), attn(channels), res(channels, channels))

        # Decoder: each stage concatenates one skip connection on the channel axis.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(size.channel_mult))):
            for block in range(size.num_res_blocks + 1):
                layers = [res(channels + skip_channels.pop(), mult * ch)]
                channels = mult * ch
                if ds in size.attention_ds:
                    layers.append(attn(channels))
                if level and block == size.num_res_blocks:
                    layers.append(Upsample(channels))
                    ds //= 2
                self.up.append(Stage(*layers))

        self.out = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_init(nn.Conv2d(channels, self.out_channels, 3, padding=1))
        )
        self.levels = len(size.channel_mult)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z_t (N, C, H, W), t (N,) training timesteps, labels (N,) in [0, num_classes]."""
        if z_t.shape[-1] % 2 ** (self.levels - 1) or z_t.shape[-2] % 2 ** (self.levels - 1):
            raise ValueError(f"latent size {tuple(z_t.shape[-2:])} must be divisible by {2 ** (self.levels - 1)}")
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features).to(z_t.dtype))
        emb = emb + self.class_embed(labels)  # (N, 4·ch)

        h = self.input_conv(z_t)  # (N, ch, H, W)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)  # (N, ch·mult[-1], H / 2^(levels−1), W / 2^(levels−1))
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)  # (N, C or 2C, H, W)

    def _run(self, stage: Stage, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute activations in backward: trades ~30% more compute for memory.
            return checkpoint(stage, h, emb, use_reentrant=False)
        return stage(h, emb)


def build_unet(
    size: str,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = False,
    dropout: float = 0.0,
    gradient_checkpointing: bool = False,
) -> UNet:
    """A UNet of a named size (see UNET_SIZES)."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(UNET_SIZES)}")
    return UNet(in_channels, num_classes, UNET_SIZES[size], learn_sigma, dropout, gradient_checkpointing)
