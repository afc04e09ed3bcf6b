"""The inference export: EMA weights as safetensors plus the configs to rebuild and decode, no DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..diffusion import GaussianDiffusion
from ..inference import build_from_info
from ..models import UNet

WEIGHTS, RAW_WEIGHTS, CONFIG = "ema.safetensors", "model.safetensors", "config.json"


def write_export(
    directory: str | Path,
    weights: dict[str, torch.Tensor],
    info: dict[str, Any],
    raw: dict[str, torch.Tensor] | None = None,
) -> Path:
    """run.dir/export/: ema.safetensors (what samplers use), model.safetensors (the trained weights, for
    fine-tuning; when given) and config.json (model, diffusion, codec, latent shape, classes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in ((WEIGHTS, weights), (RAW_WEIGHTS, raw)):
        if tensors is not None:
            save_file(
                {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, directory / (name + ".tmp")
            )
            (directory / (name + ".tmp")).replace(directory / name)
    (directory / (CONFIG + ".tmp")).write_text(json.dumps(info, indent=1, sort_keys=True))
    (directory / (CONFIG + ".tmp")).replace(directory / CONFIG)
    return directory


def load_export(directory: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, GaussianDiffusion, dict]:
    """(model in eval mode with EMA weights, the training diffusion chain, the export's config)."""
    directory = Path(directory)
    if (directory / "export" / CONFIG).is_file():  # a run directory
        directory = directory / "export"
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds no export ({CONFIG} + {WEIGHTS}); run python -m launch.export")
    info = json.loads((directory / CONFIG).read_text())
    model, diffusion = build_from_info(info)
    model.load_state_dict(load_file(directory / WEIGHTS))
    return model.to(device).eval(), diffusion, info
