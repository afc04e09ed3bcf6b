"""Latent codecs: images <-> latents. A diffusers AutoencoderKL, or a lossless pixel codec.

Encoders return the VAE posterior as moments (mean and log-variance stacked on the channel
axis) so the data loader can draw a fresh latent z = mean + std·ε every time it sees a
sample; the pixel codec is deterministic and returns the sample itself. The diffusion model
works on scaled latents (z − shift_factor) · scaling_factor (Rombach et al. 2022, Sec. 4.3);
the factors travel in the dataset manifest so a latent is never decoded with another scaling.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

# Names of the floating-point formats, for train.precision and encode_latents --precision alike.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PixelCodec:
    """Images as they are: uint8 RGB scaled to [−1, 1]. Exactly invertible after float16 storage."""

    name = "pixel"
    moments = False
    latent_channels = 3
    downsample = 1

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": None,
            "subfolder": None,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, H, W) float32 in [−1, 1]."""
        return images.float() / 127.5 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [−1, 1] -> uint8. Rounding undoes float16 storage: its error at 1 is ~5e-4 < 1/255."""
        return ((latents.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class AutoencoderKLCodec:
    """A diffusers AutoencoderKL (SD, SDXL, sd-vae-ft-ema, ...), from a hub id or a local folder."""

    name = "autoencoder_kl"
    moments = True

    def __init__(
        self,
        model: str,
        subfolder: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        from diffusers import AutoencoderKL

        try:
            # from_pretrained initialises the modules randomly before loading the weights: keep that
            # off the caller's RNG, so loading a VAE mid-training (grids, FID) leaves its trajectory alone.
            with torch.random.fork_rng(devices=[]):
                self.vae = AutoencoderKL.from_pretrained(model, subfolder=subfolder, low_cpu_mem_usage=False)
        except (OSError, ValueError) as e:
            where = f"{model!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise ValueError(
                f"cannot load the VAE {where}: {str(e).splitlines()[0]}. Pass a local folder holding a diffusers "
                "AutoencoderKL (config.json + weights; add --vae-subfolder vae for a full pipeline), a hub id "
                "that is reachable or cached, or --vae pixel"
            ) from None
        self.model, self.subfolder = model, subfolder
        self.device = torch.device(device)
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)
        self.dtype = PRECISIONS[precision]
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "subfolder": self.subfolder,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 2C, H/f, W/f) float32 moments [mean, log-variance]."""
        x = images.to(self.device, non_blocking=True).float() / 127.5 - 1.0
        with self._autocast():
            posterior = self.vae.encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, H/f, W/f) unscaled latents -> (N, 3, H, W) uint8."""
        with self._autocast():
            x = self.vae.decode(latents.to(self.device).float()).sample
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


Codec = PixelCodec | AutoencoderKLCodec


def load_codec(
    vae: str, subfolder: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> Codec:
    """`pixel` or an AutoencoderKL hub id / local path."""
    if vae == PixelCodec.name:
        return PixelCodec()
    return AutoencoderKLCodec(vae, subfolder, device, precision)


def codec_from_manifest(info: dict[str, Any], device: str | torch.device = "cpu") -> Codec:
    """The codec a dataset was encoded with, from its manifest's "codec" entry."""
    if info["name"] == PixelCodec.name:
        return PixelCodec()
    if info["name"] == AutoencoderKLCodec.name:
        return AutoencoderKLCodec(info["model"], info.get("subfolder"), device)
    raise ValueError(f"unknown codec {info['name']!r} in the manifest")


def x0_clip(info: dict[str, Any]) -> float | None:
    """Bound for x̂_0 while sampling: pixels live in [−1, 1], so a pixel model's x̂_0 is clipped there (as
    ADM does); VAE latents have no fixed range. Without it, x̂_0 = (z − sqrt(1 − ᾱ)ε) / sqrt(ᾱ) explodes at
    the last step of schedules whose ᾱ_T is ~0 (cosine)."""
    if info["name"] == PixelCodec.name:
        return float(info["scaling_factor"]) * (1.0 + abs(float(info.get("shift_factor") or 0.0)))
    return None


def to_model_space(z: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """VAE latent -> the diffusion model's space: (z − shift) · scaling."""
    return (z - info["shift_factor"]) * info["scaling_factor"]


def from_model_space(latent: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """The diffusion model's space -> VAE latent: latent / scaling + shift."""
    return latent / info["scaling_factor"] + info["shift_factor"]
