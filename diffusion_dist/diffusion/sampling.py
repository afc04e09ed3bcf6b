"""Samplers (DDPM ancestral, DDIM) and guidance (classifier-free, classifier).

Samplers take a `ModelFn` (z_t, t) -> [ε] or [ε, v], with t the training timestep; the
guidance helpers build such functions from a conditional model. Any guidance works with
any sampler because both are expressed as a change of ε (Dhariwal & Nichol 2021, Sec. 4.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .gaussian import GaussianDiffusion, Prediction, at_timestep
from .losses import ConditionalModel, NoisyClassifierFn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (z_t, t) -> ∇_{z_t} log p_φ(c | z_t, t), same shape as z_t.
GradLogProb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Called after every step with (step index i, z_{t−1}, prediction at step i).
Callback = Callable[[int, torch.Tensor, Prediction], None]


def classifier_free_guidance(model: ConditionalModel, labels: torch.Tensor, null_label: int, scale: float) -> ModelFn:
    """ε̃ = (1 + w)·ε_θ(z_t, t, c) − w·ε_θ(z_t, t, ∅)  (Ho & Salimans 2022, Eq. 6).

    Conditional and unconditional predictions come from one batched forward. Guidance
    applies to all latent channels of ε; learned variance channels take the conditional
    prediction's values.
    """

    def guided(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(labels, null_label)
        out = model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)  # each (N, C or 2C, ...)
        channels = z_t.shape[1]
        eps = (1 + scale) * cond[:, :channels] - scale * uncond[:, :channels]
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided


def conditional(model: ConditionalModel, labels: torch.Tensor) -> ModelFn:
    """The plain conditional model ε_θ(z_t, t, c), no guidance."""
    return lambda z_t, t: model(z_t, t, labels)


def classifier_grad(classifier: NoisyClassifierFn, labels: torch.Tensor) -> GradLogProb:
    """∇_{z_t} log p_φ(c | z_t, t) of a classifier on noisy inputs that returns logits."""

    def grad(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(z, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(labels), device=labels.device), labels]
            return torch.autograd.grad(selected.sum(), z)[0]

    return grad


def classifier_guidance(
    model_fn: ModelFn, grad_log_prob: GradLogProb, alphas_cumprod: torch.Tensor, scale: float
) -> ModelFn:
    """ε̃ = ε_θ − s·sqrt(1 − ᾱ_t)·∇ log p_φ(c | z_t)  (Dhariwal & Nichol 2021, Algorithm 2).

    alphas_cumprod is the training chain's ᾱ, indexed by training timestep. Stacks on top
    of classifier-free guidance when model_fn is already guided.
    """

    def guided(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(z_t, t)
        channels = z_t.shape[1]
        sigma = at_timestep((1.0 - alphas_cumprod).sqrt(), t, z_t)
        eps = out[:, :channels] - scale * sigma * grad_log_prob(z_t, t)
        return torch.cat([eps, out[:, channels:]], dim=1)

    return guided


def ddpm_step(pred: Prediction, noise: torch.Tensor | None) -> torch.Tensor:
    """z_{t−1} = μ_θ(z_t, t) + σ_t·noise; noise is None on the last step, where z_0 is the mean."""
    return pred.mean if noise is None else pred.mean + torch.exp(0.5 * pred.log_variance) * noise


def ddim_step(
    diffusion: GaussianDiffusion,
    pred: Prediction,
    t: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_{t−1} = sqrt(ᾱ_{t−1}) x̂_0 + sqrt(1 − ᾱ_{t−1} − σ_t²) ε_θ + σ_t·noise  (Song et al. 2021, Eq. 12).

    σ_t = η·sqrt((1 − ᾱ_{t−1}) / (1 − ᾱ_t))·sqrt(1 − ᾱ_t / ᾱ_{t−1}): deterministic at η = 0.
    """
    alpha_bar = at_timestep(diffusion.alphas_cumprod, t, pred.pred_x0)
    alpha_bar_prev = at_timestep(diffusion.alphas_cumprod_prev, t, pred.pred_x0)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    z = alpha_bar_prev.sqrt() * pred.pred_x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * pred.eps
    return z if noise is None else z + sigma * noise


def _reverse_chain(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    step: Callable[[int, torch.Tensor, Prediction, torch.Tensor], torch.Tensor],
    clip_x0: float | None,
    progress: bool,
    callback: Callback | None,
    desc: str,
) -> torch.Tensor:
    """Walk the (respaced) chain from z_T = noise down to z_0, one `step(i, t, prediction, z)` at a time."""
    z = noise
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc=desc, disable=not progress):
        t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
        pred = diffusion.p_mean_variance(model_fn(z, diffusion.timesteps.to(z.device)[t]), z, t, clip_x0)
        z = step(i, t, pred, z)
        if callback is not None:
            callback(i, z, pred)
    return z


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020), on the (respaced) chain from z_T = noise."""

    def step(i: int, t: torch.Tensor, pred: Prediction, z: torch.Tensor) -> torch.Tensor:
        return ddpm_step(pred, _randn_like(z, generator) if i > 0 else None)

    return _reverse_chain(model_fn, diffusion, noise, step, clip_x0, progress, callback, "DDPM")


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on the (respaced) chain from z_T = noise: deterministic at η = 0."""

    def step(i: int, t: torch.Tensor, pred: Prediction, z: torch.Tensor) -> torch.Tensor:
        return ddim_step(diffusion, pred, t, eta, _randn_like(z, generator) if eta > 0 and i > 0 else None)

    return _reverse_chain(model_fn, diffusion, noise, step, clip_x0, progress, callback, "DDIM")


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}


def generate(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    seed: int,
    sampler: str = "ddim",
    device: torch.device | str = "cpu",
    **sampler_kwargs,
) -> torch.Tensor:
    """Samples of `shape` from a fixed seed: the same seed, model and chain give the same samples."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=device)
    return SAMPLERS[sampler](model_fn, diffusion, noise, generator=generator, **sampler_kwargs)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
