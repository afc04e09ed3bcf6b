"""The training objectives: ε-matching with DDPM-IP input perturbation and null-token dropout for the
diffusion model; cross-entropy on noisy inputs for the guidance classifier."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .gaussian import GaussianDiffusion

# (z_t, t, labels, **text) -> model output [ε] or [ε, v], with t the training timestep; a text model also
# takes context=, context_mask= and pooled= keyword tensors.
ConditionalModel = Callable[..., torch.Tensor]
# (z_t, t) -> logits of p_φ(c | z_t, t), with t the training timestep.
NoisyClassifierFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def diffusion_draws(
    generator: torch.Generator,
    shape: tuple[int, ...],
    num_timesteps: int,
    p_uncond: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The random draws of `diffusion_loss` for N samples of `shape` = (N, ...), on the generator's device.

    Drawn in this fixed order, whatever γ and p_uncond: "t" ~ U{0..T−1} (N,) int64, "eps" ε ~ N(0, I)
    (shape), "xi" ξ ~ N(0, I) (shape), "drop" ~ Bernoulli(p_uncond) (N,) bool, the null-token
    dropout. Runs that differ only in γ therefore see the same t, ε and dropout. The trainer calls it
    per sample (N = 1) with a generator keyed to the sample (data/stream.py, "Draws").
    """
    n, device = shape[0], generator.device
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    xi = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    drop = torch.rand(n, generator=generator, device=device) < p_uncond
    return {"t": t, "eps": eps, "xi": xi, "drop": drop}


def classifier_draws(
    generator: torch.Generator, shape: tuple[int, ...], num_timesteps: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The random draws of `classifier_loss` for N samples of `shape` = (N, ...), in this order:
    "t" ~ U{0..T−1} (N,) int64, then "eps" ε ~ N(0, I) (shape)."""
    n, device = shape[0], generator.device
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return {"t": t, "eps": eps}


def drop_labels(labels: torch.Tensor, drop: torch.Tensor, null_label: int) -> torch.Tensor:
    """Replace the labels where `drop` is set by the null token ∅.

    Trains one network as both ε_θ(z, t, c) and ε_θ(z, t, ∅) for classifier-free guidance
    (Ho & Salimans 2022, Algorithm 1). Labels that already are ∅ (unlabelled data) stay ∅.
    """
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def diffusion_loss(
    model: ConditionalModel,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    labels: torch.Tensor,
    draws: dict[str, torch.Tensor],
    *,
    null_label: int,
    input_perturbation: float = 0.1,
    vlb_weight: float = 0.001,
) -> dict[str, torch.Tensor]:
    """The training loss of a batch for given draws (`diffusion_draws`); every term has shape (N,).

    DDPM-IP (Ning et al. 2023, Algorithm 1) builds the model input from the perturbed noise,
    z_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t)(ε + γ ξ), while the target stays ε; this simulates the
    prediction error the sampler meets at test time. γ = 0 is exactly the plain DDPM loss. The
    labels are replaced by ∅ where draws["drop"] is set.

    Returns "loss" (what to average and backpropagate), "mse", "vb" and "t".
    """
    t, eps = draws["t"], draws["eps"]
    labels = drop_labels(labels, draws["drop"], null_label)
    z_t = diffusion.q_sample(x0, t, eps + input_perturbation * draws["xi"])
    model_output = model(z_t, diffusion.timesteps.to(t.device)[t], labels)
    terms = diffusion.loss_terms(model_output, x0, z_t, t, eps, vlb_weight)
    terms["t"] = t
    return terms


def classifier_loss(
    classifier: NoisyClassifierFn,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    labels: torch.Tensor,
    draws: dict[str, torch.Tensor],
    *,
    null_label: int,
) -> dict[str, torch.Tensor]:
    """Cross-entropy of p_φ(c | z_t, t) on z_t ~ q(z_t | x_0) for given draws t, ε (`classifier_draws`)
    (Dhariwal & Nichol 2021, Sec. 4.1).

    The classifier sees the same noisy inputs the sampler will guide, at every timestep of the
    training chain. Unlabelled samples (label ∅) weigh 0. Every term has shape (N,): "loss",
    "correct" (1 where the argmax is the label), "labelled" (the weights) and "t".
    """
    t = draws["t"]
    logits = classifier(diffusion.q_sample(x0, t, draws["eps"]), diffusion.timesteps.to(t.device)[t]).float()
    labelled = labels != null_label
    target = torch.where(labelled, labels, torch.zeros_like(labels))
    loss = F.cross_entropy(logits, target, reduction="none") * labelled
    correct = (logits.argmax(dim=1) == target) & labelled
    return {"loss": loss, "correct": correct.float(), "labelled": labelled.float(), "t": t}


def timestep_quartile_sums(
    t: torch.Tensor, values: torch.Tensor, num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of per-sample `values` in each quarter of [0, T), shapes (4,) and (4,).

    ADM logs the loss per timestep quartile; sums and counts (not means) can be summed
    over steps and ranks before one division at log time, without a host sync per step.
    """
    quartile = (t * 4 // num_timesteps).clamp(max=3)
    sums = torch.zeros(4, dtype=torch.float64, device=values.device).index_add_(0, quartile, values.detach().double())
    counts = torch.zeros(4, dtype=torch.float64, device=values.device).index_add_(
        0, quartile, torch.ones_like(values, dtype=torch.float64)
    )
    return sums, counts
