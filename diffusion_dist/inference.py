"""From an export to images: guided sampling in latent space, then decoding with the dataset's codec.

Guidance: classifier-free (the model's own ∅ prediction), classifier guidance with a noisy-latent
classifier export, or both; any of them with DDPM or DDIM. The classifier-free scale is the seed's
w of ε̃ = (1 + w)·ε_θ(c) − w·ε_θ(∅); DiT, GLIDE and diffusers write s = 1 + w.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .codecs import Codec, codec_from_manifest, from_model_space, x0_clip
from .diffusion import GaussianDiffusion, classifier_free_guidance, classifier_grad, conditional, generate
from .diffusion.sampling import GradLogProb, ModelFn
from .export import ExportInfo
from .models import NoisyClassifier, UNet
from .pictures import grid_image, row_labels


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


def guided_model_fn(model: UNet, labels: torch.Tensor, guidance: Guidance) -> ModelFn:
    """ε̃ for `labels`: classifier-free guidance with w = guidance.cfg_scale (conditional models, w > 0).

    An unconditional model (num_classes = 0) is called with ∅. Classifier guidance is the sampler's
    (it moves DDPM's mean, DDIM's ε): pass it guidance.grad_log_prob(labels) and guidance.classifier_scale.
    """
    model_labels = labels if model.num_classes else torch.full_like(labels, model.null_label)
    if guidance.cfg_scale > 0 and model.num_classes:
        return classifier_free_guidance(model, model_labels, model.null_label, guidance.cfg_scale)
    return conditional(model, model_labels)


class SampleGrid:
    """Guided sample grids from EMA weights during training, with fixed labels and a fixed seed so
    that the grids of different steps compare: one row per class, `per_class` columns.

    Rows are up to `max_classes` evenly spaced classes. The model copy and the codec are built
    once; sampling never touches the global RNG, so it does not change the training trajectory.
    """

    def __init__(
        self,
        info: ExportInfo,
        device: torch.device,
        *,
        seed: int = 0,
        max_classes: int = 10,
        per_class: int = 8,
    ) -> None:
        self.info, self.device, self.seed = info, device, seed
        num_classes = info.model.num_classes
        self.classes = sorted(
            {c * num_classes // min(num_classes, max_classes) for c in range(min(num_classes, max_classes))}
        )
        self.labels = [c for c in self.classes for _ in range(per_class)]
        self.row_labels = row_labels(self.classes, info.dataset.class_names)
        self.model, self.diffusion, self.codec = sampling_copy(info, device)

    def __call__(self, ema_weights: dict[str, torch.Tensor]) -> np.ndarray:
        """One labelled uint8 grid image, a row per class, from these weights."""
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
        )
        return grid_image(images, rows=len(self.classes), labels=self.row_labels)


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
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for `labels`, the same for the same seed and arguments.

    Batch b draws its noise from seed + b·batch_size. `codec` decodes the latents; by default the one `info` names
    is loaded (a VAE: seconds).
    """
    codec = codec or codec_from_manifest(info.codec, device)
    chain = diffusion.respaced(steps)
    shape = info.latent_shape
    images = []
    for start in range(0, len(labels), batch_size):
        chunk = torch.tensor(labels[start : start + batch_size], device=device)
        latents = generate(
            guided_model_fn(model, chunk, guidance),
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
