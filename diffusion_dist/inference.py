"""From an export to images: guided sampling in latent space, then decoding with the dataset's codec.

Guidance: classifier-free (the model's own ∅ prediction), classifier guidance with a noisy-latent
classifier export, or both; any of them with DDPM or DDIM. The classifier-free scale is the seed's
w of ε̃ = (1 + w)·ε_θ(c) − w·ε_θ(∅); DiT, GLIDE and diffusers write s = 1 + w.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from .codecs import Codec, codec_from_manifest, from_model_space, x0_clip
from .diffusion import GaussianDiffusion, classifier_free_guidance, classifier_grad, conditional, generate
from .diffusion.sampling import GradLogProb, ModelFn
from .export import ExportInfo
from .models import NoisyClassifier, UNet
from .objectives import text_arguments
from .pictures import grid_image, row_labels

PROMPT_BATCH = 64  # prompts per text-encoder forward


def sampling_copy(info: ExportInfo, device: str | torch.device) -> tuple[UNet, GaussianDiffusion, Codec]:
    """A model copy in eval mode, its chain and codec for sampling during training (grids, FID): built
    without drawing from the training RNG (model init here, the VAE's in the codec)."""
    with torch.random.fork_rng(devices=[]):
        model = info.build_model()
    return model.to(device).eval(), info.chain(), codec_from_manifest(info.codec, device)


class Guidance(NamedTuple):
    """How to steer sampling: classifier-free scale w, and optionally a noisy classifier with scale s.

    w is the seed's: ε̃ = (1 + w)·ε_θ(z_t, c) − w·ε_θ(z_t, ∅), so w = 0 is the plain conditional model;
    DiT's, GLIDE's and diffusers' guidance scale is 1 + w (their 1.5 is w = 0.5).
    """

    cfg_scale: float = 0.0
    classifier: NoisyClassifier | None = None
    classifier_scale: float = 0.0

    def grad_log_prob(self, labels: torch.Tensor) -> GradLogProb | None:
        """∇ log p_φ(c | z_t) of the classifier for `labels`; None without classifier guidance (s = 0)."""
        if self.classifier is None or self.classifier_scale <= 0:
            return None
        return classifier_grad(self.classifier, labels)


def check_classifier(info: ExportInfo, classifier_info: ExportInfo) -> None:
    """Raise ValueError unless the classifier export was trained on the model's chain and latents."""
    if classifier_info.model.kind != "classifier":
        raise ValueError("--classifier: the export is not a classifier (train one with model.kind=classifier)")
    for key in ("schedule", "num_timesteps"):
        theirs, ours = getattr(classifier_info.diffusion, key), getattr(info.diffusion, key)
        if theirs != ours:
            raise ValueError(
                f"--classifier: trained with diffusion.{key}={theirs!r}, the model with {ours!r}; "
                "its p(c | z_t) is for other noise levels: train it with the model's"
            )
    if classifier_info.latent_shape != info.latent_shape or classifier_info.codec != info.codec:
        raise ValueError("--classifier: trained on latents of another shape or codec than the model's")
    if info.model.num_classes and classifier_info.model.num_classes != info.model.num_classes:
        raise ValueError(
            f"--classifier: {classifier_info.model.num_classes} classes, the model has {info.model.num_classes}"
        )


def guided_model_fn(
    model: UNet,
    labels: torch.Tensor,
    guidance: Guidance,
    text: Mapping[str, torch.Tensor] | None = None,
    null_text: Mapping[str, torch.Tensor] | None = None,
) -> ModelFn:
    """ε̃ for `labels` (and `text`, batched like the labels, for a text model): classifier-free guidance
    with w = guidance.cfg_scale against ∅ (the null label, and the model's null text), for w > 0.

    An unconditional model (num_classes = 0) is called with the null label. Classifier guidance is the
    sampler's (it moves DDPM's mean, DDIM's ε): pass it guidance.grad_log_prob(labels) and
    guidance.classifier_scale.
    """
    null_labels = torch.full_like(labels, model.null_label)
    cond = {"labels": labels if model.num_classes else null_labels, **text_arguments(text)}
    if text is not None:
        if null_text is None:
            raise ValueError("a text model samples with its null text (the export's null_text.safetensors)")
        rows = len(labels)
        null_text = {k: v.to(text[k].device).expand(rows, *v.shape) for k, v in null_text.items()}
    null = {"labels": null_labels, **text_arguments(null_text)}
    if guidance.cfg_scale > 0 and (model.num_classes or text is not None):
        return classifier_free_guidance(model, cond, null, guidance.cfg_scale)
    return conditional(model, cond)


def encode_prompts(
    info: ExportInfo, prompts: list[str], device: str | torch.device, encoder: str | None = None
) -> dict[str, torch.Tensor]:
    """A text model's prompts encoded by the text encoder its data was encoded with: the one the export
    names, or `encoder` (a local folder, say) when it is the same encoder (same weights and vocabulary);
    another encoder is refused."""
    from .text import TextEncoder

    if info.text_encoder is None:
        raise ValueError("this model takes no text: sample it with class labels")
    text_encoder = TextEncoder.from_record(info.text_encoder, encoder, device)
    # Each distinct prompt once, PROMPT_BATCH at a time: a grid repeats every prompt per column, and a
    # large encoder (T5-XXL) must not see thousands of prompts in one forward.
    distinct = list(dict.fromkeys(prompts))
    position = {prompt: i for i, prompt in enumerate(distinct)}
    parts = [text_encoder.encode(distinct[i : i + PROMPT_BATCH]) for i in range(0, max(len(distinct), 1), PROMPT_BATCH)]
    rows = torch.tensor([position[prompt] for prompt in prompts], dtype=torch.long)
    keys = ("embedding", "mask") + (("pooled",) if text_encoder.pooled_size is not None else ())
    return {key: torch.cat([getattr(batch, key) for batch in parts])[rows] for key in keys}


class SampleGrid:
    """Guided sample grids from EMA weights during training, with fixed conditions and a fixed seed so
    that the grids of different steps compare: one row per class (up to `max_classes` evenly spaced
    ones) or, for a text model given `prompts`, one row per prompt; `per_class` columns.

    The model copy, the codec and the prompts' encoding are made once; sampling never touches the
    global RNG, so it does not change the training trajectory.
    """

    def __init__(
        self,
        info: ExportInfo,
        device: torch.device,
        *,
        seed: int = 0,
        max_classes: int = 10,
        per_class: int = 8,
        prompts: list[str] | None = None,
        null_text: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.info, self.device, self.seed = info, device, seed
        self.text = self.null_text = None
        if prompts:
            self.rows, self.row_labels = len(prompts), list(prompts)
            self.labels = [info.model.num_classes] * (len(prompts) * per_class)  # ∅: text alone conditions the rows
            prompts = [prompt for prompt in prompts for _ in range(per_class)]
            with torch.random.fork_rng(devices=[]):  # the encoder's construction must not draw from the training RNG
                self.text = encode_prompts(info, prompts, device)
            self.null_text = null_text
        else:
            num_classes = info.model.num_classes
            classes = sorted(
                {c * num_classes // min(num_classes, max_classes) for c in range(min(num_classes, max_classes))}
            )
            self.rows, self.row_labels = len(classes), row_labels(classes, info.dataset.class_names)
            self.labels = [c for c in classes for _ in range(per_class)]
        self.model, self.diffusion, self.codec = sampling_copy(info, device)

    def __call__(self, ema_weights: dict[str, torch.Tensor]) -> np.ndarray:
        """One labelled uint8 grid image, a row per class or prompt, from these weights."""
        self.model.load_state_dict(ema_weights)
        defaults = self.info.diffusion
        images = generate_images(
            self.model,
            self.diffusion,
            self.info,
            self.labels,
            Guidance(defaults.guidance_scale),
            steps=defaults.sample_steps,
            sampler=defaults.sampler,
            seed=self.seed,
            device=self.device,
            codec=self.codec,
            text=self.text,
            null_text=self.null_text,
        )
        return grid_image(images, rows=self.rows, labels=self.row_labels)


@torch.no_grad()
def generate_images(
    model: UNet,
    diffusion: GaussianDiffusion,
    info: ExportInfo,
    labels: list[int],
    guidance: Guidance,
    *,
    steps: int,
    sampler: str = "ddim",
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
    codec: Codec | None = None,
    text: Mapping[str, torch.Tensor] | None = None,
    null_text: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for `labels` (and, for a text model, `text`: one row of each tensor
    per label), the same for the same seed and arguments.

    Batch b draws its noise from seed + b·batch_size. `codec` decodes the latents; by default the one
    `info` names is loaded (a VAE: seconds).
    """
    codec = codec or codec_from_manifest(info.codec, device)
    chain = diffusion.respaced(steps)
    shape = info.latent_shape
    images = []
    for start in range(0, len(labels), batch_size):
        chunk = torch.tensor(labels[start : start + batch_size], device=device)
        rows = None if text is None else {k: v[start : start + batch_size].to(device) for k, v in text.items()}
        latents = generate(
            guided_model_fn(model, chunk, guidance, rows, null_text),
            chain,
            (len(chunk), *shape),
            seed=seed + start,
            sampler=sampler,
            device=device,
            progress=progress,
            clip_x0=x0_clip(info.codec),
            grad_log_prob=guidance.grad_log_prob(chunk),
            classifier_scale=guidance.classifier_scale,
        )
        decoded = codec.decode(from_model_space(latents, info.codec))  # (B, 3, H, W) uint8
        images.append(decoded.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images)
