"""Class- and text-conditional UNet for ε-prediction on latents, in the lineage of ADM (Dhariwal & Nichol 2021).

Residual blocks take the timestep embedding plus a class embedding through scale-shift
GroupNorm (AdaGN); self-attention at chosen resolutions uses torch's scaled_dot_product_attention.
The class table has num_classes + 1 rows; the last, index num_classes, is the null token ∅
for classifier-free guidance.

Text (Rombach et al. 2022, Sec. 3.3; Podell et al. 2023, Sec. 2.1): with context_dim > 0 every
self-attention block is followed by cross-attention from the image tokens to the text encoder's
token embeddings (N, L, context_dim), padding tokens masked out; with pooled_dim > 0 a pooled text
vector (N, pooled_dim) is embedded and added to the timestep embedding, as SDXL does. Class and
text conditions combine or stand alone (num_classes = 0: the class table is the ∅ row only).
Both text paths start at zero, so a model without text is a text model's exact starting point.
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
    attention_ds: tuple[int, ...]  # downsampling factors (1, 2, 4, ...) that get self- (and cross-) attention
    num_head_channels: int = 64  # channels per attention head


# Named sizes, with or without text. Parameter counts and GFLOPs per sample at 4×32×32 and 4×64×64
# are in README.md (benchmarks/model_sizes.py prints them); UNet-XL is near DiT-XL/2's compute.
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
    """Multi-head self-attention over the H·W positions, with a residual connection; in a text model
    (context_dim > 0) followed by cross-attention to the text tokens (`cross`).

    q, k and v come out of the projection with a contiguous head dimension, which fused (flash)
    attention kernels need: without one SDPA falls back to its math path, which materialises
    the (H·W)² attention matrix.
    """

    def __init__(self, channels: int, num_head_channels: int, context_dim: int = 0) -> None:
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = group_norm(channels)
        self.qkv = TokenLinear(channels, 3 * channels)
        self.proj = zero_init(TokenLinear(channels, channels))
        # A child module, so that every other parameter keeps the name it has in a model without text.
        self.cross = CrossAttentionBlock(channels, context_dim, num_head_channels) if context_dim else None

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, H·W, C)
        qkv = self.qkv(tokens).reshape(n, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, H·W, C / heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        x = x + self.proj(out).transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)
        if self.cross is not None:
            x = self.cross(x, context, context_mask)
        return x


class CrossAttentionBlock(nn.Module):
    """Multi-head cross-attention from the H·W image positions to L text tokens, with a residual
    connection (the attn2 of Stable Diffusion's transformer block, Rombach et al. 2022, Sec. 3.3).

    softmax(q kᵀ / √d + log m) v per head, with q from the GroupNorm'd image tokens and k, v from
    the context; m (N, L) is the text mask, 1 for real tokens, 0 for padding. k and v have no bias:
    a key bias adds q·b_k to every score of a row (softmax ignores it) and a value bias passes
    through the convex combination to the output, where `proj` has one. The output projection
    starts at zero, so a new block is the identity (ADM's rule) and a text model starts as the
    same model without text. A sample whose mask has no real token gets no cross-attention
    (the block is the identity for it) rather than the NaN of a softmax over nothing.
    """

    def __init__(self, channels: int, context_dim: int, num_head_channels: int) -> None:
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = group_norm(channels)
        self.q = TokenLinear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.proj = zero_init(TokenLinear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W), context (N, L, context_dim), context_mask (N, L) bool, True for real tokens."""
        n, c, h, w = x.shape
        length, d = context.shape[1], c // self.num_heads
        tokens = self.norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, H·W, C)
        q = self.q(tokens).reshape(n, h * w, self.num_heads, d).transpose(1, 2)  # (N, heads, H·W, d)
        kv = self.kv(context).reshape(n, length, 2, self.num_heads, d)  # (N, L, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, d)
        attn_mask, keep = None, None
        if context_mask is not None:
            keep = context_mask.any(dim=1)[:, None, None]  # (N, 1, 1): the sample has a real token
            # Broadcast over heads and queries; a row with no real token attends to every token
            # (a finite softmax) and its result is dropped below.
            attn_mask = (context_mask | ~keep[:, 0])[:, None, None, :]  # (N, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, heads, H·W, d)
        out = self.proj(out.transpose(1, 2).reshape(n, h * w, c))  # (N, H·W, C)
        if keep is not None:
            out = out * keep.to(out.dtype)  # (N, H·W, C); 0 where the sample has no real token
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)


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
    """A run of layers that share the conditioning (embedding and text context), checkpointed as one unit."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, emb, context, context_mask) if isinstance(layer, AttentionBlock) else layer(x, emb)
        return x


def encoder_stages(
    size: UNetSize, emb_dim: int, dropout: float, context_dim: int = 0
) -> tuple[nn.ModuleList, list[int]]:
    """The down path of a named size, shared by the UNet and the noisy classifier (ADM's encoder half).

    Returns the stages and the channels of every skip connection, input convolution first;
    the last entry is the width at the lowest resolution. context_dim > 0 adds cross-attention
    to the text after each self-attention.
    """
    ch = size.model_channels
    stages, skip_channels = nn.ModuleList(), [ch]
    channels, ds = ch, 1
    for level, mult in enumerate(size.channel_mult):
        for _ in range(size.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(channels, mult * ch, emb_dim, dropout)]
            channels = mult * ch
            if ds in size.attention_ds:
                layers.append(AttentionBlock(channels, size.num_head_channels, context_dim))
            stages.append(Stage(*layers))
            skip_channels.append(channels)
        if level != len(size.channel_mult) - 1:
            stages.append(Stage(Downsample(channels)))
            skip_channels.append(channels)
            ds *= 2
    return stages, skip_channels


class UNet(nn.Module):
    """ε_θ(z_t, t, c): (N, C, H, W) latents -> (N, C or 2C, H, W); H and W divisible by 2^(levels−1).

    c is a class label, text (context_dim > 0: token embeddings (N, L, context_dim) and their mask;
    pooled_dim > 0: a pooled vector (N, pooled_dim)), or both. context_dim = pooled_dim = 0 is the
    class model, with exactly its parameters and their names.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        size: UNetSize,
        learn_sigma: bool = False,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        context_dim: int = 0,
        pooled_dim: int = 0,
    ) -> None:
        super().__init__()
        if context_dim < 0 or pooled_dim < 0:
            raise ValueError(f"context_dim and pooled_dim must be >= 0, got {context_dim} and {pooled_dim}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.null_label = num_classes  # last row of the class table
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        self.gradient_checkpointing = gradient_checkpointing
        ch = size.model_channels
        emb_dim = 4 * ch

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim)
        # SDXL's add_embedding: an MLP like the time embedding's, its sum added to the time embedding.
        # Its last layer starts at zero (SDXL's does not) so that a fresh text model starts as the
        # class model, the cross-attention's rule; the first layer's gradient is then 0 for one step.
        self.pooled_embed = (
            nn.Sequential(nn.Linear(pooled_dim, emb_dim), nn.SiLU(), zero_init(nn.Linear(emb_dim, emb_dim)))
            if pooled_dim
            else None
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, size.num_head_channels, context_dim)

        # Encoder: every stage's output is kept as a skip connection for the decoder.
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, skip_channels = encoder_stages(size, emb_dim, dropout, context_dim)
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

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_t (N, C, H, W), t (N,) training timesteps, labels (N,) in [0, num_classes] (num_classes is ∅;
        a text-only model has num_classes = 0 and takes ∅ = 0); context (N, L, context_dim) text token
        embeddings and context_mask (N, L) bool or 0/1, True for real tokens and False for padding
        (None: every token is real); pooled (N, pooled_dim)."""
        if z_t.shape[-1] % 2 ** (self.levels - 1) or z_t.shape[-2] % 2 ** (self.levels - 1):
            raise ValueError(f"latent size {tuple(z_t.shape[-2:])} must be divisible by {2 ** (self.levels - 1)}")
        context, context_mask, pooled = self._check_text(z_t, context, context_mask, pooled)
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features).to(z_t.dtype))
        emb = emb + self.class_embed(labels)  # (N, 4·ch)
        if self.pooled_embed is not None:
            emb = emb + self.pooled_embed(pooled)  # (N, 4·ch)

        h = self.input_conv(z_t)  # (N, ch, H, W)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, context_mask)  # (N, ch·mult[-1], H / 2^(levels−1), ·)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (N, C or 2C, H, W)

    def _check_text(
        self,
        z_t: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        pooled: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The text inputs checked against the model's widths: context and pooled in z_t's dtype, the mask as bool."""
        n = z_t.shape[0]
        if not self.context_dim and (context is not None or context_mask is not None):
            raise ValueError("this model has no cross-attention (context_dim=0) but was given a context")
        if not self.pooled_dim and pooled is not None:
            raise ValueError("this model takes no pooled text vector (pooled_dim=0) but was given one")
        if self.context_dim:
            if context is None:
                raise ValueError(f"this text model needs context: token embeddings (N, L, {self.context_dim})")
            if context.ndim != 3 or context.shape[::2] != (n, self.context_dim) or not context.shape[1]:
                raise ValueError(f"context must be (N={n}, L>0, {self.context_dim}), got {tuple(context.shape)}")
            context = context.to(z_t.dtype)
            if context_mask is not None:
                if context_mask.shape != context.shape[:2]:
                    raise ValueError(
                        f"context_mask must be (N, L) = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
                    )
                if context_mask.is_floating_point() or context_mask.is_complex():
                    raise ValueError(f"context_mask must be bool or 0/1 (1: a real token), got {context_mask.dtype}")
                context_mask = context_mask.bool()
        if self.pooled_dim:
            if pooled is None:
                raise ValueError(f"this text model needs pooled: a pooled text vector (N, {self.pooled_dim})")
            if pooled.shape != (n, self.pooled_dim):
                raise ValueError(f"pooled must be (N={n}, {self.pooled_dim}), got {tuple(pooled.shape)}")
            pooled = pooled.to(z_t.dtype)
        return context, context_mask, pooled

    def _run(
        self,
        stage: Stage,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute activations in backward: trades ~30% more compute for memory. The text tensors
            # are arguments, like h and emb, so checkpoint() sees every input the stage depends on.
            return checkpoint(stage, h, emb, context, context_mask, use_reentrant=False)
        return stage(h, emb, context, context_mask)


def build_unet(
    size: str,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = False,
    dropout: float = 0.0,
    gradient_checkpointing: bool = False,
    context_dim: int = 0,
    pooled_dim: int = 0,
) -> UNet:
    """A UNet of a named size (see UNET_SIZES); context_dim / pooled_dim > 0 make it a text model."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(UNET_SIZES)}")
    return UNet(
        in_channels,
        num_classes,
        UNET_SIZES[size],
        learn_sigma,
        dropout,
        gradient_checkpointing,
        context_dim,
        pooled_dim,
    )
