"""What a model of each kind is and learns: one Objective per `model.kind`, chosen once.

The training loop and inference both go through these: the loop for the network to train and
the loss of a micro batch, inference and exports for the network to rebuild from its record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .diffusion import GaussianDiffusion, classifier_draws, classifier_loss, diffusion_draws, diffusion_loss
from .models import build_classifier, build_unet

if TYPE_CHECKING:
    from .config import Config

# The network under training, called as its loss calls it: (z_t, t, labels) for a UNet, (z_t, t) for a classifier.
Network = Callable[..., torch.Tensor]


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
    ) -> nn.Module:
        raise NotImplementedError

    def draw(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """One sample's random draws for `loss` (t, noise, ...), each without a batch axis, from `generator`.

        The data loader calls it per sample with a generator keyed to the sample's global index, and
        stacks the results: the loss of a sample does not depend on which rank computes it.
        """
        raise NotImplementedError

    def loss(
        self, network: Network, latents: torch.Tensor, labels: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms for the batch's stacked `draws`, each (N,): "loss", "t" and the kind's own."""
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
    ) -> None:
        super().__init__(diffusion, null_label)
        self.p_uncond, self.input_perturbation, self.vlb_weight = p_uncond, input_perturbation, vlb_weight

    @classmethod
    def from_config(cls, config: Config) -> DiffusionObjective:
        d = config.diffusion
        return cls(
            GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.variance),
            config.model.num_classes,
            p_uncond=d.p_uncond,
            input_perturbation=d.input_perturbation,
            vlb_weight=d.vlb_weight,
        )

    @staticmethod
    def build(size, in_channels, num_classes, *, learn_sigma, dropout=0.0, gradient_checkpointing=False) -> nn.Module:
        return build_unet(size, in_channels, num_classes, learn_sigma, dropout, gradient_checkpointing)

    def draw(self, generator, latent_shape):
        drawn = diffusion_draws(generator, (1, *latent_shape), self.diffusion.num_timesteps, self.p_uncond)
        return {name: value[0] for name, value in drawn.items()}  # t (), eps (C, H, W), xi (C, H, W), drop ()

    def loss(self, network, latents, labels, draws):
        return diffusion_loss(
            network,
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
    def build(size, in_channels, num_classes, *, learn_sigma, dropout=0.0, gradient_checkpointing=False) -> nn.Module:
        return build_classifier(size, in_channels, num_classes, dropout, gradient_checkpointing)

    def draw(self, generator, latent_shape):
        drawn = classifier_draws(generator, (1, *latent_shape), self.diffusion.num_timesteps)
        return {name: value[0] for name, value in drawn.items()}  # t (), eps (C, H, W)

    def loss(self, network, latents, labels, draws):
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
