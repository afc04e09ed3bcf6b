"""What a model of each kind is and learns: one Objective per `model.kind`, chosen once.

The training loop and inference both go through these: the loop for the network to train and
the loss of a micro batch, inference and exports for the network to rebuild from its record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .diffusion import GaussianDiffusion, classifier_draws, classifier_loss, diffusion_draws, diffusion_loss
from .models import build_classifier, build_unet

if TYPE_CHECKING:
    from .config import Config

# The network under training, called as its loss calls it: (z_t, t, labels) for a UNet (and text keyword
# tensors for a text model), (z_t, t) for a classifier.
Network = Callable[..., torch.Tensor]


def text_arguments(text: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """A batch's text (the loader's and TextEncoder's names) as the UNet's keyword arguments."""
    if text is None:
        return {}
    arguments = {"context": text["embedding"], "context_mask": text["mask"]}
    if text.get("pooled") is not None:
        arguments["pooled"] = text["pooled"]
    return arguments


def text_dims(encoder: Mapping[str, Any] | None) -> dict[str, int]:
    """The UNet's context_dim and pooled_dim for a text encoder's record (none: a model without text)."""
    if encoder is None:
        return {}
    return {"context_dim": int(encoder["hidden_size"]), "pooled_dim": int(encoder.get("pooled_size") or 0)}


class Objective:
    """The network of a model kind, the loss of a batch and how the loss of a batch is averaged."""

    kind: ClassVar[str]
    generates: ClassVar[bool]  # samples images (grids, FID) rather than scoring them

    def __init__(self, diffusion: GaussianDiffusion, null_label: int) -> None:
        self.diffusion, self.null_label = diffusion, null_label

    @classmethod
    def from_config(cls, config: Config) -> Objective:
        """The objective a run of `config` trains, on its diffusion chain."""
        d = config.diffusion
        return cls(GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.variance), config.model.num_classes)

    @staticmethod
    def build(
        size: str,
        in_channels: int,
        num_classes: int,
        *,
        learn_sigma: bool,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        text_encoder: Mapping[str, Any] | None = None,
    ) -> nn.Module:
        """The untrained network; `text_encoder` (the record of diffusion_dist.text) makes it take text."""
        raise NotImplementedError

    def draw(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """One sample's random draws for `loss` (t, noise, ...), each without a batch axis, from `generator`.

        The data loader calls it per sample with a generator keyed to the sample's global index, and
        stacks the results: the loss of a sample does not depend on which rank computes it.
        """
        raise NotImplementedError

    def loss(
        self,
        network: Network,
        latents: torch.Tensor,
        labels: torch.Tensor,
        draws: dict[str, torch.Tensor],
        text: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms for the batch's stacked `draws`, each (N,): "loss", "t" and the kind's own.
        `text` is the batch's text for a text model (the loader nulled it where draws["drop_text"], else
        draws["drop"], is set)."""
        raise NotImplementedError

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar to backpropagate for one micro batch."""
        return terms["loss"].mean()


class DiffusionObjective(Objective):
    """ε-prediction with DDPM-IP input perturbation and null-token dropout (model.kind=unet)."""

    kind = "unet"
    generates = True

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        null_label: int,
        *,
        p_uncond: float = 0.1,
        input_perturbation: float = 0.1,
        vlb_weight: float = 0.001,
        text: bool = False,
    ) -> None:
        super().__init__(diffusion, null_label)
        self.p_uncond, self.input_perturbation, self.vlb_weight = p_uncond, input_perturbation, vlb_weight
        # Class and text together: each is also dropped alone, so that either conditions the model on its own.
        self.separate_drops = text and null_label > 0

    @classmethod
    def from_config(cls, config: Config) -> DiffusionObjective:
        d = config.diffusion
        return cls(
            GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.variance),
            config.model.num_classes,
            p_uncond=d.p_uncond,
            input_perturbation=d.input_perturbation,
            vlb_weight=d.vlb_weight,
            text=config.model.text,
        )

    @staticmethod
    def build(
        size, in_channels, num_classes, *, learn_sigma, dropout=0.0, gradient_checkpointing=False, text_encoder=None
    ) -> nn.Module:
        dims = text_dims(text_encoder)
        return build_unet(size, in_channels, num_classes, learn_sigma, dropout, gradient_checkpointing, **dims)

    def draw(self, generator, latent_shape):
        """t (), eps (C, H, W), xi (C, H, W), drop (): ∅ for the label, and for the text unless "drop_text".

        A model of class and text draws two more, after the others (so the shared draws stay those of
        every other model): with probability p_uncond each, the label alone ("drop") or the text alone
        ("drop_text") is dropped too. Both go together with probability p_uncond, which trains ε(z, ∅, ∅)
        for guidance; one alone with about p_uncond·(1 − p_uncond) each, which trains sampling from a
        prompt alone (class ∅) or a class alone (null text)."""
        drawn = diffusion_draws(generator, (1, *latent_shape), self.diffusion.num_timesteps, self.p_uncond)
        drawn = {name: value[0] for name, value in drawn.items()}
        if self.separate_drops:
            label_alone, text_alone = torch.rand(2, generator=generator, device=generator.device) < self.p_uncond
            drawn["drop"], drawn["drop_text"] = drawn["drop"] | label_alone, drawn["drop"] | text_alone
        return drawn

    def loss(self, network, latents, labels, draws, text=None):
        arguments = text_arguments(text)
        return diffusion_loss(
            (lambda z_t, t, y: network(z_t, t, y, **arguments)) if arguments else network,
            self.diffusion,
            latents,
            labels,
            draws,
            null_label=self.null_label,
            input_perturbation=self.input_perturbation,
            vlb_weight=self.vlb_weight,
        )


class ClassifierObjective(Objective):
    """Cross-entropy of a noisy-latent classifier p_φ(c | z_t, t), for classifier guidance
    (model.kind=classifier); unlabelled samples weigh 0. Logs accuracy besides the loss."""

    kind = "classifier"
    generates = False

    @staticmethod
    def build(
        size, in_channels, num_classes, *, learn_sigma, dropout=0.0, gradient_checkpointing=False, text_encoder=None
    ) -> nn.Module:
        if text_encoder is not None:
            raise ValueError("a noisy-latent classifier takes no text: train it with model.text=false")
        return build_classifier(size, in_channels, num_classes, dropout, gradient_checkpointing)

    def draw(self, generator, latent_shape):
        drawn = classifier_draws(generator, (1, *latent_shape), self.diffusion.num_timesteps)
        return {name: value[0] for name, value in drawn.items()}  # t (), eps (C, H, W)

    def loss(self, network, latents, labels, draws, text=None):
        return classifier_loss(
            network,  # called as network(z_t, t): the classifier sees no labels
            self.diffusion,
            latents,
            labels,
            draws,
            null_label=self.null_label,
        )

    def total(self, terms):
        return terms["loss"].sum() / terms["labelled"].sum().clamp(min=1)  # the mean over labelled samples


OBJECTIVES: dict[str, type[Objective]] = {o.kind: o for o in (DiffusionObjective, ClassifierObjective)}
