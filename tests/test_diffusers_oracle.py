"""Agreement with diffusers' schedulers, an independent implementation, for the same betas."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_dist.diffusion import (
    SCHEDULES,
    GaussianDiffusion,
    condition_mean,
    condition_score,
    ddim_step,
    ddpm_step,
    get_betas,
)

SHAPE = (3, 4, 8, 8)
TIMESTEPS = [1, 10, 250, 500, 999]


def in_float64(scheduler, betas: torch.Tensor):
    """diffusers builds its tables in float32, whose rounding alone (1 − ᾱ at small t) errs by
    ~1e-4; give it float64 tables so a 1e-6 comparison tests its formulas against ours."""
    scheduler.betas = betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def ddpm_scheduler(betas: torch.Tensor, variance_type: str, **kwargs) -> DDPMScheduler:
    scheduler = DDPMScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas.numpy(),
        variance_type=variance_type,
        clip_sample=False,
        prediction_type=kwargs.pop("prediction_type", "epsilon"),
        **kwargs,
    )
    return in_float64(scheduler, betas)


def diffusers_noise(seed: int, shape: tuple) -> tuple[torch.Generator, torch.Tensor]:
    """A generator for diffusers' step and the noise it will draw from it (randn on CPU)."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.Generator().manual_seed(seed), noise


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)


def batch_t(t: int) -> torch.Tensor:
    return torch.full((SHAPE[0],), t, dtype=torch.long)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_posterior_mean_and_variance(schedule, t):
    betas = get_betas(schedule, 1000)
    diffusion = GaussianDiffusion(betas)
    x0, z_t = inputs()
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, z_t, batch_t(t))

    # With prediction_type="sample" diffusers' step is the posterior mean at x0 plus its noise.
    scheduler = ddpm_scheduler(betas, "fixed_small", prediction_type="sample")
    assert float(variance.flatten()[0]) == pytest.approx(float(scheduler._get_variance(t)), rel=1e-9)
    generator, noise = diffusers_noise(1, SHAPE)
    out = scheduler.step(x0, t, z_t, generator=generator).prev_sample
    torch.testing.assert_close(out - variance.sqrt() * noise, mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("t", TIMESTEPS + [0])
def test_ddpm_step(schedule, variance, t):
    betas = get_betas(schedule, 1000)
    diffusion = GaussianDiffusion(betas, variance)
    eps, z_t = inputs(2)
    generator, noise = diffusers_noise(3, SHAPE)
    expected = ddpm_scheduler(betas, variance).step(eps, t, z_t, generator=generator).prev_sample

    pred = diffusion.p_mean_variance(eps, z_t, batch_t(t))
    ours = ddpm_step(pred, noise if t > 0 else None)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", TIMESTEPS)
def test_ddpm_step_learned_range(t):
    betas = get_betas("linear", 1000)
    diffusion = GaussianDiffusion(betas, "learned_range")
    eps, z_t = inputs(4)
    v = torch.rand(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    model_output = torch.cat([eps, v], dim=1)
    generator, noise = diffusers_noise(6, SHAPE)
    expected = ddpm_scheduler(betas, "learned_range").step(model_output, t, z_t, generator=generator).prev_sample

    pred = diffusion.p_mean_variance(model_output, z_t, batch_t(t))
    torch.testing.assert_close(ddpm_step(pred, noise), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_respaced_ddpm_step(schedule):
    """diffusers' DDPM with 50 inference steps walks the same shortened chain as ddim50 spacing."""
    betas = get_betas(schedule, 1000)
    scheduler = ddpm_scheduler(betas, "fixed_small")
    scheduler.set_timesteps(50)
    respaced = GaussianDiffusion(betas).respaced("ddim50")
    assert respaced.timesteps.tolist() == sorted(scheduler.timesteps.tolist())

    eps, z_t = inputs(7)
    for i in (49, 30, 1):
        t = int(respaced.timesteps[i])
        generator, noise = diffusers_noise(8 + i, SHAPE)
        expected = scheduler.step(eps, t, z_t, generator=generator).prev_sample
        pred = respaced.p_mean_variance(eps, z_t, batch_t(i))
        torch.testing.assert_close(ddpm_step(pred, noise), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step(schedule, eta):
    betas = get_betas(schedule, 1000)
    scheduler = in_float64(
        DDIMScheduler(num_train_timesteps=1000, trained_betas=betas.numpy(), clip_sample=False, set_alpha_to_one=True),
        betas,
    )
    scheduler.set_timesteps(50)
    respaced = GaussianDiffusion(betas).respaced("ddim50")
    assert respaced.timesteps.tolist() == sorted(scheduler.timesteps.tolist())

    eps, z_t = inputs(9)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    for i in (49, 25, 0):
        t = int(respaced.timesteps[i])
        expected = scheduler.step(eps, t, z_t, eta=eta, variance_noise=noise).prev_sample
        pred = respaced.p_mean_variance(eps, z_t, batch_t(i))
        ours = ddim_step(respaced, pred, batch_t(i), eta, noise if eta > 0 else None)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_classifier_guided_ddpm_step_moves_diffusers_mean_by_s_sigma_grad(variance):
    """Algorithm 1 of Dhariwal & Nichol (2021) on a respaced chain: diffusers' step plus s·Σ·g, Σ its
    variance at that step (for learned_range diffusers returns log Σ)."""
    betas = get_betas("linear", 1000)
    scheduler = ddpm_scheduler(betas, variance)
    scheduler.set_timesteps(50)
    respaced = GaussianDiffusion(betas, variance).respaced("ddim50")
    eps, z_t = inputs(11)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    v = torch.rand(SHAPE, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 2 - 1
    output = torch.cat([eps, v], dim=1) if variance == "learned_range" else eps
    for i in (49, 10, 1):
        t = int(respaced.timesteps[i])
        generator, noise = diffusers_noise(14 + i, SHAPE)
        unguided = scheduler.step(output, t, z_t, generator=generator).prev_sample
        sigma2 = scheduler._get_variance(t, predicted_variance=v)
        sigma2 = sigma2.exp() if variance == "learned_range" else sigma2
        pred = respaced.p_mean_variance(output, z_t, batch_t(i))
        ours = ddpm_step(condition_mean(respaced, pred, z_t, batch_t(i), grad, 2.0), noise)
        torch.testing.assert_close(ours, unguided + 2.0 * sigma2 * grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_classifier_guided_ddim_step_is_diffusers_step_of_the_shifted_eps(eta):
    """Algorithm 2 of Dhariwal & Nichol (2021): diffusers' DDIM step given ε − s·sqrt(1 − ᾱ_t)·g."""
    betas = get_betas("cosine", 1000)
    scheduler = in_float64(
        DDIMScheduler(num_train_timesteps=1000, trained_betas=betas.numpy(), clip_sample=False, set_alpha_to_one=True),
        betas,
    )
    scheduler.set_timesteps(50)
    respaced = GaussianDiffusion(betas).respaced("ddim50")
    eps, z_t = inputs(15)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    for i in (49, 25, 1):
        t = int(respaced.timesteps[i])
        shifted = eps - 2.0 * (1 - scheduler.alphas_cumprod[t]).sqrt() * grad
        expected = scheduler.step(shifted, t, z_t, eta=eta, variance_noise=noise).prev_sample
        pred = condition_score(respaced, respaced.p_mean_variance(eps, z_t, batch_t(i)), z_t, batch_t(i), grad, 2.0)
        ours = ddim_step(respaced, pred, batch_t(i), eta, noise if eta > 0 else None)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "schedule, diffusers_kwargs",
    [
        ("linear", {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
        ("scaled_linear", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
        ("cosine", {"beta_schedule": "squaredcos_cap_v2"}),
    ],
)
def test_named_schedules_match_diffusers(schedule, diffusers_kwargs):
    expected = DDPMScheduler(num_train_timesteps=1000, **diffusers_kwargs).betas.double()
    torch.testing.assert_close(get_betas(schedule, 1000), expected, atol=1e-7, rtol=1e-5)
