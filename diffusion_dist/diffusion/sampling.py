"""Samplers (DDPM ancestral, DDIM) and guidance (classifier-free, classifier).

Samplers take a `ModelFn` (z_t, t) -> [ε] or [ε, v], with t the training timestep.
Classifier-free guidance changes ε, so it is a ModelFn built from a conditional model.
Classifier guidance is applied by the sampler to each step's prediction, given the
classifier's gradient ∇ log p_φ(c | z_t) and its scale s: DDPM shifts the mean by s·Σ·∇
(Dhariwal & Nichol 2021, Algorithm 1), DDIM shifts ε by −s·sqrt(1 − ᾱ_t)·∇ (Algorithm 2).
Both stack on classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tqdm.auto import tqdm

from .gaussian import GaussianDiffusion, Prediction, at_timestep
from .losses import ConditionalModel, NoisyClassifierFn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A conditional model's condition arguments by name (labels=..., and for text models context=...,
# context_mask=..., pooled=...), each batched along dim 0.
Conditions = Mapping[str, torch.Tensor]
# (z_t, t) -> ∇_{z_t} log p_φ(c | z_t, t), same shape as z_t.
GradLogProb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (chain, prediction, z_t, chain step t, ∇ log p_φ(c | z_t), s) -> the guided prediction.
Conditioning = Callable[[GaussianDiffusion, Prediction, torch.Tensor, torch.Tensor, torch.Tensor, float], Prediction]
# Called after every step with (step index i, z_{t−1}, prediction at step i).
Callback = Callable[[int, torch.Tensor, Prediction], None]


def classifier_free_guidance(model: ConditionalModel, cond: Conditions, null: Conditions, scale: float) -> ModelFn:
    """ε̃ = (1 + w)·ε_θ(z_t, t, c) − w·ε_θ(z_t, t, ∅)  (Ho & Salimans 2022, Eq. 6).

    `cond` and `null` are the model's condition arguments (labels, text) for c and for ∅, each
    batched along dim 0. Conditional and unconditional predictions come from one batched forward.
    Guidance applies to all latent channels of ε; learned variance channels take the conditional
    prediction's values.
    """

    def guided(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = {key: torch.cat([value, null[key]]) for key, value in cond.items()}
        out = model(torch.cat([z_t, z_t]), torch.cat([t, t]), **both)
        conditioned, unconditioned = out.chunk(2)  # each (N, C or 2C, ...)
        channels = z_t.shape[1]
        eps = (1 + scale) * conditioned[:, :channels] - scale * unconditioned[:, :channels]
        return torch.cat([eps, conditioned[:, channels:]], dim=1)

    return guided


def conditional(model: ConditionalModel, cond: Conditions) -> ModelFn:
    """The plain conditional model ε_θ(z_t, t, c), no guidance."""
    return lambda z_t, t: model(z_t, t, **cond)


def classifier_grad(classifier: NoisyClassifierFn, labels: torch.Tensor) -> GradLogProb:
    """∇_{z_t} log p_φ(c | z_t, t) of a classifier on noisy inputs that returns logits."""

    def grad(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(z, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(labels), device=labels.device), labels]
            return torch.autograd.grad(selected.sum(), z)[0]

    return grad


def condition_mean(
    diffusion: GaussianDiffusion, pred: Prediction, z_t: torch.Tensor, t: torch.Tensor, grad: torch.Tensor, scale: float
) -> Prediction:
    """μ̃ = μ_θ(z_t, t) + s·Σ_θ(z_t, t)·∇ log p_φ(c | z_t)  (Dhariwal & Nichol 2021, Algorithm 1).

    Σ_θ is the step's variance on the chain being sampled (learned or fixed, respaced or not).
    μ_θ is the one from the clipped x̂_0, which stays as it was: guided-diffusion's condition_mean.
    diffusion, z_t and t go unused; the signature is condition_score's, so a sampler can take either.
    """
    return pred._replace(mean=pred.mean + scale * pred.variance * grad)


def condition_score(
    diffusion: GaussianDiffusion, pred: Prediction, z_t: torch.Tensor, t: torch.Tensor, grad: torch.Tensor, scale: float
) -> Prediction:
    """ε̂ = ε_θ(z_t) − s·sqrt(1 − ᾱ_t)·∇ log p_φ(c | z_t)  (Dhariwal & Nichol 2021, Algorithm 2).

    ε_θ is the one implied by the clipped x̂_0; x̂_0 and μ are derived again from ε̂ and not clipped
    a second time, as in guided-diffusion's condition_score.
    """
    eps = pred.eps - scale * at_timestep(diffusion.sqrt_one_minus_alphas_cumprod, t, z_t) * grad
    pred_x0 = diffusion.predict_x0_from_eps(z_t, t, eps)
    mean, _, _ = diffusion.q_posterior_mean_variance(pred_x0, z_t, t)
    return pred._replace(mean=mean, pred_x0=pred_x0, eps=eps)


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
    *,
    condition: Conditioning,
    grad_log_prob: GradLogProb | None,
    classifier_scale: float,
    clip_x0: float | None,
    progress: bool,
    callback: Callback | None,
    desc: str,
) -> torch.Tensor:
    """Walk the (respaced) chain from z_T = noise down to z_0, one `step(i, t, prediction, z)` at a time.

    With grad_log_prob, each step's prediction (x̂_0 already clipped) is guided by `condition` first.
    """
    z = noise
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc=desc, disable=not progress):
        t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
        train_t = diffusion.timesteps.to(z.device)[t]  # models and classifiers see training timesteps
        pred = diffusion.p_mean_variance(model_fn(z, train_t), z, t, clip_x0)
        if grad_log_prob is not None:
            pred = condition(diffusion, pred, z, t, grad_log_prob(z, train_t), classifier_scale)
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
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020), on the (respaced) chain from z_T = noise.

    grad_log_prob: classifier guidance with scale s = classifier_scale, as a shift of the mean
    (Dhariwal & Nichol 2021, Algorithm 1).
    """

    def step(i: int, t: torch.Tensor, pred: Prediction, z: torch.Tensor) -> torch.Tensor:
        return ddpm_step(pred, _randn_like(z, generator) if i > 0 else None)

    return _reverse_chain(
        model_fn,
        diffusion,
        noise,
        step,
        condition=condition_mean,
        grad_log_prob=grad_log_prob,
        classifier_scale=classifier_scale,
        clip_x0=clip_x0,
        progress=progress,
        callback=callback,
        desc="DDPM",
    )


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    eta: float = 0.0,
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on the (respaced) chain from z_T = noise: deterministic at η = 0.

    grad_log_prob: classifier guidance with scale s = classifier_scale, as a shift of ε
    (Dhariwal & Nichol 2021, Algorithm 2).
    """

    def step(i: int, t: torch.Tensor, pred: Prediction, z: torch.Tensor) -> torch.Tensor:
        return ddim_step(diffusion, pred, t, eta, _randn_like(z, generator) if eta > 0 and i > 0 else None)

    return _reverse_chain(
        model_fn,
        diffusion,
        noise,
        step,
        condition=condition_score,
        grad_log_prob=grad_log_prob,
        classifier_scale=classifier_scale,
        clip_x0=clip_x0,
        progress=progress,
        callback=callback,
        desc="DDIM",
    )


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
