"""From an export to images: guided sampling in latent space, then decoding with the dataset's codec."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .codecs import codec_from_manifest, from_model_space, x0_clip
from .diffusion import GaussianDiffusion, classifier_free_guidance, generate
from .models import UNet


@torch.no_grad()
def generate_images(
    model: UNet,
    diffusion: GaussianDiffusion,
    info: dict[str, Any],
    labels: list[int],
    *,
    cfg_scale: float,
    steps: int,
    sampler: str = "ddim",
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for `labels`, the same for the same seed and arguments."""
    codec = codec_from_manifest(info["codec"], device)
    chain = diffusion.respaced(steps)
    shape = tuple(info["latent_shape"])
    images = []
    for start in range(0, len(labels), batch_size):
        chunk = torch.tensor(labels[start : start + batch_size], device=device)
        model_fn = classifier_free_guidance(model, chunk, model.null_label, cfg_scale)
        latents = generate(
            model_fn,
            chain,
            (len(chunk), *shape),
            seed=seed + start,
            sampler=sampler,
            device=device,
            progress=progress,
            clip_x0=x0_clip(info["codec"]),
        )
        decoded = codec.decode(from_model_space(latents, info["codec"]))  # (B, 3, H, W) uint8
        images.append(decoded.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, 3) -> one (rows·H, ceil(N/rows)·W, 3) image, filled row by row."""
    n, h, w, c = images.shape
    columns = -(-n // rows)
    grid = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        grid[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = image
    return grid
