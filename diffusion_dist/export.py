"""The inference export: EMA weights as safetensors plus what rebuilds and decodes the model, no DeepSpeed.

`ExportInfo` is the contract between training and everything downstream (sampling, evaluation,
classifier guidance, launch.export): built once from the config and the dataset manifest, saved as
config.json beside the weights, read back into the same dataclass. docs/contracts.md describes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .data.storage import atomic_file, redact_url
from .diffusion import GaussianDiffusion
from .objectives import OBJECTIVES

WEIGHTS, RAW_WEIGHTS, CONFIG = "ema.safetensors", "model.safetensors", "config.json"
NULL_TEXT = "null_text.safetensors"  # a text model's ∅: the encoded empty string it was trained with


class ExportError(ValueError):
    """An export that cannot be read: the message names the file and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # unet | classifier (models.MODEL_KINDS)
    size: str  # a named size of models.UNET_SIZES
    in_channels: int  # latent channels
    num_classes: int  # labels 0..num_classes−1; num_classes is the null token ∅ of a UNet


@dataclass(frozen=True)
class DiffusionInfo:
    schedule: str
    num_timesteps: int
    variance: str
    sampler: str  # the defaults of sample grids and launch.sample
    sample_steps: int
    guidance_scale: float  # w of classifier-free guidance: ε̃ = (1 + w)·ε_c − w·ε_∅ (DiT's s = 1 + w)


@dataclass(frozen=True)
class DatasetInfo:
    url: str  # credentials and query strings removed
    num_samples: int
    class_names: list[str] | None = None


@dataclass(frozen=True)
class ExportInfo:
    """What an export needs to rebuild its network and chain and to decode its samples."""

    model: ModelInfo
    diffusion: DiffusionInfo
    codec: dict[str, Any]  # the dataset manifest's codec record (codecs.codec_from_manifest)
    latent_shape: tuple[int, ...]  # (C, H, W) of one latent
    dataset: DatasetInfo
    step: int | None = None  # the optimizer step of the weights
    tracking: dict[str, str] | None = field(default=None)  # {"experiment", "run_id"} of the training run
    # A text model's encoder, as diffusion_dist.text records it (name, class, max_length, hidden_size,
    # pooled_size, sha256): prompts must be encoded by this encoder; its ∅ is in NULL_TEXT beside.
    text_encoder: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any, manifest: dict[str, Any], latent_shape: tuple[int, ...]) -> ExportInfo:
        """The record of a run of `config` (a config.Config) on the dataset of `manifest`."""
        d = config.diffusion
        text = manifest.get("text") if config.model.text else None
        return cls(
            model=ModelInfo(config.model.kind, config.model.size, latent_shape[0], config.model.num_classes),
            diffusion=DiffusionInfo(
                d.schedule, d.num_timesteps, d.variance, d.sampler, d.sample_steps, d.guidance_scale
            ),
            codec=manifest["codec"],
            latent_shape=tuple(latent_shape),
            dataset=DatasetInfo(
                redact_url(config.data.url),
                manifest["num_samples"],
                (manifest.get("labels") or {}).get("class_names"),
            ),
            text_encoder=text["encoder"] if text else None,
        )

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ExportInfo:
        """The inverse of to_dict; also reads exports written before `model.kind` existed (UNets)."""
        return cls(
            model=ModelInfo(**{"kind": "unet", **record["model"]}),
            diffusion=DiffusionInfo(**record["diffusion"]),
            codec=record["codec"],
            latent_shape=tuple(record["latent_shape"]),
            dataset=DatasetInfo(**record["dataset"]),
            step=record.get("step"),
            tracking=record.get("tracking"),
            text_encoder=record.get("text_encoder"),
        )

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["latent_shape"] = list(self.latent_shape)
        return {k: v for k, v in record.items() if v is not None}

    def replace(self, **changes: Any) -> ExportInfo:
        return ExportInfo(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, **changes})

    @property
    def learn_sigma(self) -> bool:
        return self.diffusion.variance == "learned_range"

    def build_model(self) -> torch.nn.Module:
        """The untrained network of this kind and size."""
        m = self.model
        return OBJECTIVES[m.kind].build(
            m.size, m.in_channels, m.num_classes, learn_sigma=self.learn_sigma, text_encoder=self.text_encoder
        )

    def chain(self) -> GaussianDiffusion:
        """The training diffusion chain (respace it for sampling)."""
        d = self.diffusion
        return GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.variance)


def write_export(
    directory: str | Path,
    weights: dict[str, torch.Tensor],
    info: ExportInfo,
    raw: dict[str, torch.Tensor] | None = None,
    null_text: dict[str, torch.Tensor] | None = None,
) -> Path:
    """directory/: ema.safetensors (what samplers use), model.safetensors (the trained weights, for
    fine-tuning; when given), null_text.safetensors (a text model's ∅) and config.json (ExportInfo),
    each replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (info.text_encoder is None) != (null_text is None):
        raise ValueError("a text model's export needs its null text, and only a text model's")
    for name, tensors in ((WEIGHTS, weights), (RAW_WEIGHTS, raw), (NULL_TEXT, null_text)):
        if tensors is None:
            (directory / name).unlink(missing_ok=True)  # an earlier export's: not of these weights
            continue
        as_stored = (lambda v: v) if name == NULL_TEXT else (lambda v: v.float())  # weights in fp32
        data = save({k: as_stored(v.detach()).contiguous().cpu() for k, v in tensors.items()})
        with atomic_file(directory / name) as temporary:
            temporary.write_bytes(data)
    with atomic_file(directory / CONFIG) as temporary:
        temporary.write_text(json.dumps(info.to_dict(), indent=1, sort_keys=True))
    return directory


def export_directory(path: str | Path) -> Path:
    """The export folder of `path`: an export itself, or a run directory holding export/."""
    path = Path(path)
    if (path / "export" / CONFIG).is_file():
        path = path / "export"
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds no export ({CONFIG} + {WEIGHTS}); run python -m launch.export")
    return path


def read_export_info(path: str | Path) -> ExportInfo:
    """The ExportInfo of an export folder or run directory."""
    directory = export_directory(path)
    try:
        return ExportInfo.from_dict(json.loads((directory / CONFIG).read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{directory / CONFIG} is not an export record ({e}); export the run again") from None


def load_export(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, GaussianDiffusion, ExportInfo]:
    """(network in eval mode with the EMA weights, the training diffusion chain, the export's record)."""
    directory = export_directory(path)
    info = read_export_info(directory)
    try:
        model, chain = info.build_model(), info.chain()
    except (KeyError, ValueError, TypeError) as e:  # a size, kind or schedule this version does not know
        raise ExportError(
            f"{directory / CONFIG} describes no model this version builds ({e}); export the run again"
        ) from None
    try:
        weights = load_file(directory / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{directory / WEIGHTS} cannot be read ({e}); export the run again") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors: another model's weights
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # torch: a title, then reasons
        reason = (lines[1] if len(lines) > 1 else lines[0]) if lines else type(e).__name__
        raise ExportError(
            f"{directory / WEIGHTS} does not hold the weights {directory / CONFIG} describes "
            f"({info.model.kind} {info.model.size}: {reason[:300]}); export the run again"
        ) from None
    return model.to(device).eval(), chain, info


def load_null_text(path: str | Path, info: ExportInfo) -> dict[str, torch.Tensor]:
    """A text model export's ∅: "embedding" (L, D), "mask" (L,) bool, and "pooled" (P,) when the encoder
    has one, checked against the encoder `info` records."""
    from .text import null_text_problem

    directory = export_directory(path)
    if info.text_encoder is None:
        raise ExportError(f"{directory} is not a text model: it has no null text")
    try:
        null = load_file(directory / NULL_TEXT)
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{directory / NULL_TEXT} cannot be read ({e}); export the run again") from None
    problem = null_text_problem(null, info.text_encoder)
    if problem:
        raise ExportError(f"{directory / NULL_TEXT} {problem}; export the run again")
    return {**null, "mask": null["mask"].bool()}
