"""Closed forms: the forward process, the posterior, optimal-denoiser sampling, the loss, guidance."""

import math

import pytest
import torch

from diffusion_dist.diffusion import (
    SCHEDULES,
    GaussianDiffusion,
    classifier_free_guidance,
    classifier_grad,
    condition_mean,
    condition_score,
    diffusion_draws,
    diffusion_loss,
    drop_labels,
    generate,
    get_betas,
    sample_ddim,
    sample_ddpm,
    space_timesteps,
    timestep_quartile_sums,
)


def batch_t(t: int, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long)


# Schedules and respacing.


def test_linear_schedule_end_points():
    betas = get_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert betas.dtype == torch.float64


def test_cosine_schedule_alpha_bar_closed_form():
    """Π(1 − β_i) telescopes to f(t + 1) / f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2), where β is unclipped."""
    T, s = 1000, 0.008
    alpha_bar = torch.cumprod(1 - get_betas("cosine", T), 0)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        get_betas("quadratic", 1000)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps == sorted(set(steps))
    assert space_timesteps(300, "10,15,20")[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert len(space_timesteps(300, "10,15,20")) == 45


def improved_diffusion_ddim_stride(num_timesteps: int, count: int) -> int | None:
    """improved-diffusion's rule for "ddimN": the first stride 1, 2, ... whose range(0, T, stride) has N steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return stride
    return None


def test_ddim_spacing_takes_the_smallest_stride_with_exactly_n_steps():
    """ddim30 of T = 1000 is 0, 34, ..., 986 (stride 33 would give 31 steps), as in improved-diffusion."""
    assert space_timesteps(1000, "ddim30") == list(range(0, 1000, 34))
    for num_timesteps in (1000, 250, 97):
        for count in range(2, num_timesteps + 1):
            stride = improved_diffusion_ddim_stride(num_timesteps, count)
            if stride is None:
                with pytest.raises(ValueError, match=f"no integer stride gives exactly {count} of"):
                    space_timesteps(num_timesteps, f"ddim{count}")
            else:
                assert space_timesteps(num_timesteps, f"ddim{count}") == list(range(0, num_timesteps, stride))
    # One step is stride T (improved-diffusion's loop stops one stride short of it); 0 and > T steps have none.
    assert space_timesteps(1000, "ddim1") == [0]
    for count in (0, 999, 1001):
        with pytest.raises(ValueError, match="ddim spacing: no integer stride"):
            space_timesteps(1000, f"ddim{count}")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_respacing_keeps_marginals(schedule):
    """The short chain has the same ᾱ at its steps, so q(z_t | x_0) is unchanged."""
    full = GaussianDiffusion.from_schedule(schedule)
    short = full.respaced(100)
    torch.testing.assert_close(short.alphas_cumprod, full.alphas_cumprod[short.timesteps], rtol=1e-10, atol=0)
    same = full.respaced(1000)
    torch.testing.assert_close(same.betas, full.betas, rtol=1e-9, atol=0)
    # Respacing a respaced chain maps through to training timesteps.
    assert short.respaced("ddim10").timesteps.tolist() == short.timesteps[::10].tolist()


# Forward process and posterior.


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_mean_and_variance(t):
    diffusion = GaussianDiffusion.from_schedule("linear")
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    z = diffusion.q_sample(x0, batch_t(t, n), torch.randn(n, 1, dtype=torch.float64))
    alpha_bar = diffusion.alphas_cumprod[t].item()
    std = math.sqrt(1 - alpha_bar)
    assert z.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=5 * std / math.sqrt(n))
    assert z.var().item() == pytest.approx(1 - alpha_bar, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_x0_from_exact_eps_is_exact(schedule):
    diffusion = GaussianDiffusion.from_schedule(schedule)
    x0, eps = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64)
    for t in (0, 1, 500, 999):
        z_t = diffusion.q_sample(x0, batch_t(t, 16), eps)
        torch.testing.assert_close(diffusion.predict_x0_from_eps(z_t, batch_t(t, 16), eps), x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(diffusion.predict_eps_from_x0(z_t, batch_t(t, 16), x0), eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_gaussian_conditioning(t):
    """q(z_{t−1} | z_t, x_0) by conditioning the joint Gaussian of (z_{t−1}, z_t) given x_0."""
    diffusion = GaussianDiffusion.from_schedule("cosine")
    alpha_bar_prev, alpha_bar = diffusion.alphas_cumprod[t - 1].item(), diffusion.alphas_cumprod[t].item()
    alpha = 1 - diffusion.betas[t].item()
    x0, z_t = torch.randn(2, 5, 3, dtype=torch.float64)
    # z_{t−1} = sqrt(ᾱ_{t−1}) x0 + n1; z_t = sqrt(α_t) z_{t−1} + sqrt(β_t) n2.
    var_prev, var_t = 1 - alpha_bar_prev, 1 - alpha_bar
    cov = math.sqrt(alpha) * var_prev
    expected_mean = math.sqrt(alpha_bar_prev) * x0 + cov / var_t * (z_t - math.sqrt(alpha_bar) * x0)
    expected_var = var_prev - cov**2 / var_t
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, z_t, batch_t(t, 5))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
    assert var.flatten()[0].item() == pytest.approx(expected_var, rel=1e-9)
    assert log_var.flatten()[0].item() == pytest.approx(math.log(expected_var), rel=1e-9)


# Sampling with the exact denoiser of Gaussian data N(μ, σ²I).


MU, SIGMA = 1.5, 0.5


def gaussian_eps(base: GaussianDiffusion, mu=MU, sigma=SIGMA):
    """E[ε | z_t] for x_0 ~ N(μ, σ²): z_t ~ N(aμ, a²σ² + s²) gives ε* = s (z_t − aμ) / (a²σ² + s²).

    base is the training chain: samplers call the model with training timesteps.
    """

    def eps(z, t):
        a = base.sqrt_alphas_cumprod[t].reshape(-1, 1)
        s = base.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1)
        return s * (z - a * mu) / (a**2 * sigma**2 + s**2)

    return eps


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_with_exact_denoiser_recovers_the_gaussian(variance):
    diffusion = GaussianDiffusion.from_schedule("linear", variance=variance)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    x = sample_ddpm(gaussian_eps(diffusion), diffusion, z_T, generator=g)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.03)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_exact_denoiser_recovers_the_gaussian(schedule):
    """η = 0 DDIM integrates the probability-flow ODE, which for Gaussian data is the affine map
    x = μ + σ (z_T − a_T μ) / sqrt(a_T² σ² + s_T²); DDIM's error shrinks as steps grow (first order)."""
    base = GaussianDiffusion.from_schedule(schedule)
    z_T = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, s = base.sqrt_alphas_cumprod[-1].item(), base.sqrt_one_minus_alphas_cumprod[-1].item()
    exact = MU + SIGMA * (z_T - a * MU) / math.sqrt(a**2 * SIGMA**2 + s**2)
    errors = []
    for steps in (100, 250, 1000):
        x = sample_ddim(gaussian_eps(base), base.respaced(steps), z_T)
        errors.append((x - exact).abs().max().item())
        if steps == 250:
            assert x.mean().item() == pytest.approx(MU, abs=0.01)
            assert x.std().item() == pytest.approx(SIGMA, rel=0.015)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.012


def test_generate_is_reproducible_from_its_seed():
    base = GaussianDiffusion.from_schedule("linear")
    diffusion = base.respaced(20)
    eps = lambda z, t: gaussian_eps(base)(z.double(), t).float()  # noqa: E731
    for sampler in ("ddpm", "ddim"):
        a = generate(eps, diffusion, (8, 2), seed=3, sampler=sampler)
        b = generate(eps, diffusion, (8, 2), seed=3, sampler=sampler)
        c = generate(eps, diffusion, (8, 2), seed=4, sampler=sampler)
        assert torch.equal(a, b) and not torch.equal(a, c)


# The training loss.


class RecordingModel:
    """Returns a fixed function of z_t and records what the loss feeds it."""

    def __init__(self, channels: int = 3, learn_sigma: bool = False):
        self.channels, self.learn_sigma = channels, learn_sigma

    def __call__(self, z_t, t, labels):
        self.z_t, self.t, self.labels = z_t, t, labels
        out = 0.5 * z_t
        return torch.cat([out, torch.tanh(z_t)], dim=1) if self.learn_sigma else out


def test_zero_perturbation_is_the_plain_loss():
    diffusion = GaussianDiffusion.from_schedule("linear")
    model = RecordingModel()
    x0 = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 10, (64,))
    draws = diffusion_draws(torch.Generator().manual_seed(0), x0.shape, diffusion.num_timesteps, 0.1, x0.dtype)
    terms = diffusion_loss(model, diffusion, x0, labels, draws, null_label=10, input_perturbation=0.0)
    # z_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε, so the model input determines ε; the target must be that ε.
    eps = diffusion.predict_eps_from_x0(model.z_t, terms["t"], x0)
    plain = ((eps - 0.5 * model.z_t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["loss"], plain, rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["vb"], torch.zeros(64, dtype=torch.float64))


def test_input_perturbation_perturbs_the_input_not_the_target():
    """DDPM-IP: the noise in z_t is ε + γξ (variance 1 + γ²) while the target stays ε."""
    gamma = 0.5
    diffusion = GaussianDiffusion.from_schedule("linear")
    x0 = torch.randn(4096, 2, 4, 4, dtype=torch.float64)
    labels = torch.zeros(4096, dtype=torch.long)

    class EchoInputNoise:  # predicts exactly the noise that built z_t
        def __call__(self, z_t, t, labels):
            self.input_noise = diffusion.predict_eps_from_x0(z_t, t, x0)
            return self.input_noise

    model = EchoInputNoise()
    draws = diffusion_draws(torch.Generator().manual_seed(1), x0.shape, diffusion.num_timesteps, 0.1, x0.dtype)
    terms = diffusion_loss(model, diffusion, x0, labels, draws, null_label=1, input_perturbation=gamma)
    assert model.input_noise.var().item() == pytest.approx(1 + gamma**2, rel=0.02)
    # Predicting ε + γξ instead of ε costs E‖γξ‖² = γ² per dimension.
    assert terms["mse"].mean().item() == pytest.approx(gamma**2, rel=0.02)

    # The draws of t, ε and label dropout do not depend on γ (diffusion_draws does not take it), and
    # with γ = 0 the input noise is exactly the target ε.
    plain = diffusion_loss(model, diffusion, x0, labels, draws, null_label=1, input_perturbation=0.0)
    assert torch.equal(plain["t"], terms["t"]) and plain["mse"].max().item() < 1e-20


def test_null_token_dropout_rate():
    n, p = 200_000, 0.1
    labels = torch.randint(0, 7, (n,))
    draws = diffusion_draws(torch.Generator().manual_seed(0), (n,), 1000, p_uncond=p)
    dropped = drop_labels(labels, draws["drop"], null_label=7)
    rate = (dropped == 7).float().mean().item()
    assert rate == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    kept = dropped != 7
    assert torch.equal(dropped[kept], labels[kept])
    never = diffusion_draws(torch.Generator().manual_seed(0), (n,), 1000, p_uncond=0.0)["drop"]
    assert torch.equal(drop_labels(labels, never, 7), labels)


def test_loss_feeds_dropped_labels_to_the_model():
    diffusion = GaussianDiffusion.from_schedule("linear")
    model = RecordingModel()
    n, p = 20_000, 0.25
    draws = diffusion_draws(torch.Generator().manual_seed(0), (n, 3, 1, 1), diffusion.num_timesteps, p_uncond=p)
    diffusion_loss(model, diffusion, torch.randn(n, 3, 1, 1), torch.randint(0, 5, (n,)), draws, null_label=5)
    assert (model.labels == 5).float().mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    assert model.t.min() >= 0 and model.t.max() < 1000


def test_vlb_term_vanishes_at_the_true_posterior_and_trains_only_the_variance():
    diffusion = GaussianDiffusion.from_schedule("linear", variance="learned_range")
    x0, eps = torch.randn(2, 8, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 5, 50, 100, 400, 700, 900, 999])
    z_t = diffusion.q_sample(x0, t, eps)
    # Exact ε and v = −1 (Σ = β̃_t) give the true posterior: KL = 0 for t > 0.
    exact = torch.cat([eps, -torch.ones_like(eps)], dim=1)
    assert diffusion.vb_terms_bpd(exact, x0, z_t, t).abs().max().item() < 1e-9

    output = torch.cat([eps + 0.1 * torch.randn_like(eps), torch.zeros_like(eps)], dim=1).requires_grad_(True)
    terms = diffusion.loss_terms(output, x0, z_t, t, eps)
    assert (terms["vb"] > 0).all()
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert grad[:, :3].abs().max().item() == 0 and grad[:, 3:].abs().max().item() > 0


def test_timestep_quartile_sums():
    t = torch.tensor([0, 249, 250, 999, 500, 750])
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    sums, counts = timestep_quartile_sums(t, loss, 1000)
    assert sums.tolist() == [3.0, 3.0, 5.0, 10.0] and counts.tolist() == [2, 1, 1, 2]


# Guidance.


def toy_conditional_model(z, t, labels):
    """A stand-in conditional model with 2C outputs: depends on the label, time and input."""
    eps = z * (labels.float() + 1).reshape(-1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1) / 1000
    return torch.cat([eps, -eps], dim=1)


def test_classifier_free_guidance_formula():
    z, t, labels = torch.randn(4, 4, 2, 2), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 1])
    cond, uncond = toy_conditional_model(z, t, labels), toy_conditional_model(z, t, torch.full_like(labels, 9))
    null = {"labels": torch.full_like(labels, 9)}
    zero = classifier_free_guidance(toy_conditional_model, {"labels": labels}, null, 0.0)(z, t)
    torch.testing.assert_close(zero, cond)
    guided = classifier_free_guidance(toy_conditional_model, {"labels": labels}, null, 2.0)(z, t)
    # ε̃ = 3ε_c − 2ε_∅ on all four latent channels; the variance channels stay conditional.
    torch.testing.assert_close(guided[:, :4], 3 * cond[:, :4] - 2 * uncond[:, :4])
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])


def test_classifier_free_guidance_uses_one_batched_forward():
    calls = []

    def model(z, t, labels):
        calls.append(len(z))
        return torch.zeros_like(z)

    labels = torch.tensor([0, 1, 2])
    guided = classifier_free_guidance(model, {"labels": labels}, {"labels": torch.full_like(labels, 3)}, 4.0)
    guided(torch.randn(3, 4, 2, 2), torch.tensor([5, 5, 5]))
    assert calls == [6]


def test_classifier_grad_of_a_linear_softmax():
    """∇_z log softmax(Wz)_c = W_c − Σ_k p_k W_k."""
    weight = torch.randn(5, 6, dtype=torch.float64)
    classifier = lambda z, t: z.flatten(1) @ weight.T  # noqa: E731
    z, labels = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 4, 2])
    probs = torch.softmax(z @ weight.T, dim=-1)
    expected = weight[labels] - probs @ weight
    torch.testing.assert_close(classifier_grad(classifier, labels)(z, torch.zeros(3)), expected)


# Classifier guidance (Dhariwal & Nichol 2021), checked against the paper's algorithms written out here
# on a respaced chain, with a toy model ε(z, t), v(z) and a known gradient g(z, t) = ∇ log p(c | z_t).

GUIDED_STEPS = [0, 3, 10, 40, 120, 300, 600, 999]  # training timesteps: small t is where DDPM's two shifts differ
CENTRE = 0.5


def toy_model_output(z, t, learn_sigma: bool):
    """ε = 0.3 z + t/1000 and, learned, v = tanh(z): depends on the training timestep, not the chain step."""
    eps = 0.3 * z + t.double().reshape(-1, 1) / 1000
    return torch.cat([eps, torch.tanh(z)], dim=1) if learn_sigma else eps


def toy_grad(z, t):
    """∇ of log p(c | z_t) = −(1 + t/1000)·‖z − 0.5‖² / 2."""
    return -(1 + t.double().reshape(-1, 1) / 1000) * (z - CENTRE)


def chain_tables() -> dict[str, list[float]]:
    """ᾱ, ᾱ_prev, α, β, Σ per chain step i, from the training betas, by the papers' formulas."""
    alpha_bar_train = torch.cumprod(1 - get_betas("linear", 1000), 0).tolist()
    alpha_bar = [alpha_bar_train[t] for t in GUIDED_STEPS]
    alpha_bar_prev = [1.0] + alpha_bar[:-1]
    alpha = [a / p for a, p in zip(alpha_bar, alpha_bar_prev, strict=True)]
    beta = [1 - a for a in alpha]
    posterior = [b * (1 - p) / (1 - a) for b, p, a in zip(beta, alpha_bar_prev, alpha_bar, strict=True)]
    return {"alpha_bar": alpha_bar, "alpha_bar_prev": alpha_bar_prev, "alpha": alpha, "beta": beta,
            "posterior": posterior}  # fmt: skip


def step_variance(tables, i: int, variance: str, z: torch.Tensor) -> torch.Tensor:
    """Σ of chain step i: β̃_i, β_i, or exp(v' log β_i + (1 − v') log β̃_i) (Nichol & Dhariwal 2021, Eq. 15);
    β̃ at i = 0 is taken from i = 1 where it goes into a log or stands in for β_0 (ADM)."""
    beta, posterior = tables["beta"][i], tables["posterior"][i]
    if variance == "fixed_small":
        return torch.full_like(z, posterior)
    floor = posterior if i > 0 else tables["posterior"][1]
    if variance == "fixed_large":
        return torch.full_like(z, beta if i > 0 else floor)
    frac = (torch.tanh(z) + 1) / 2
    return torch.exp(frac * math.log(beta) + (1 - frac) * math.log(floor))


def guided_ddpm_by_hand(z, variance, scale, clip_x0, generator):
    """Algorithm 1: z_{t−1} ~ N(μ + s·Σ·g, Σ), μ the posterior mean at the (clipped) x̂_0."""
    tables = chain_tables()
    for i in range(len(GUIDED_STEPS) - 1, -1, -1):
        t = torch.full((len(z),), GUIDED_STEPS[i])
        eps = toy_model_output(z, t, variance == "learned_range")[:, :2]
        a_bar, a_bar_prev = tables["alpha_bar"][i], tables["alpha_bar_prev"][i]
        alpha, beta = tables["alpha"][i], tables["beta"][i]
        if clip_x0 is None:  # Ho et al. 2020, Algorithm 2
            mean = (z - beta / math.sqrt(1 - a_bar) * eps) / math.sqrt(alpha)
        else:  # Eq. 7 at the clipped x̂_0
            x0 = ((z - math.sqrt(1 - a_bar) * eps) / math.sqrt(a_bar)).clamp(-clip_x0, clip_x0)
            mean = (math.sqrt(a_bar_prev) * beta * x0 + math.sqrt(alpha) * (1 - a_bar_prev) * z) / (1 - a_bar)
        sigma2 = step_variance(tables, i, variance, z)
        z = mean + scale * sigma2 * toy_grad(z, t)
        if i > 0:
            z = z + sigma2.sqrt() * torch.randn(z.shape, generator=generator, dtype=z.dtype)
    return z


def guided_ddim_by_hand(z, scale, clip_x0):
    """Algorithm 2 (η = 0) after guided-diffusion's condition_score: clip x̂_0, take ε from it, shift ε by
    −s·sqrt(1 − ᾱ_t)·g, then x̂_0 from the shifted ε, not clipped again; DDIM's Eq. 12."""
    tables = chain_tables()
    for i in range(len(GUIDED_STEPS) - 1, -1, -1):
        t = torch.full((len(z),), GUIDED_STEPS[i])
        eps = toy_model_output(z, t, False)
        a_bar, a_bar_prev = tables["alpha_bar"][i], tables["alpha_bar_prev"][i]
        if clip_x0 is not None:
            x0 = ((z - math.sqrt(1 - a_bar) * eps) / math.sqrt(a_bar)).clamp(-clip_x0, clip_x0)
            eps = (z - math.sqrt(a_bar) * x0) / math.sqrt(1 - a_bar)
        eps = eps - scale * math.sqrt(1 - a_bar) * toy_grad(z, t)
        x0 = (z - math.sqrt(1 - a_bar) * eps) / math.sqrt(a_bar)
        z = math.sqrt(a_bar_prev) * x0 + math.sqrt(1 - a_bar_prev) * eps
    return z


def toy_start(n: int = 64) -> torch.Tensor:
    return 3 * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
def test_ddpm_classifier_guidance_is_algorithm_1(variance, clip_x0):
    """DDPM moves the mean by s·Σ·g, Σ the (respaced, learned) step variance, after clipping x̂_0
    (guided-diffusion's condition_mean); not by the s·β_t/sqrt(α_t)·g an ε shift would give."""
    chain = GaussianDiffusion.from_schedule("linear", variance=variance).respaced(GUIDED_STEPS)
    model_fn = lambda z, t: toy_model_output(z, t, variance == "learned_range")  # noqa: E731
    for scale in (0.0, 3.0):
        ours = sample_ddpm(
            model_fn, chain, toy_start(), grad_log_prob=toy_grad, classifier_scale=scale, clip_x0=clip_x0,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        expected = guided_ddpm_by_hand(toy_start(), variance, scale, clip_x0, torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("clip_x0", [None, 1.0])
def test_ddim_classifier_guidance_is_algorithm_2(clip_x0):
    """DDIM shifts ε by −s·sqrt(1 − ᾱ_t)·g, after clipping x̂_0 and before deriving the new, unclipped
    x̂_0 from it (guided-diffusion's condition_score)."""
    chain = GaussianDiffusion.from_schedule("linear").respaced(GUIDED_STEPS)
    model_fn = lambda z, t: toy_model_output(z, t, False)  # noqa: E731
    unclipped = []
    record = lambda i, z, pred: unclipped.append(pred.pred_x0.abs().max().item() > 1.0)  # noqa: E731
    for scale in (0.0, 3.0):
        ours = sample_ddim(
            model_fn, chain, toy_start(), grad_log_prob=toy_grad, classifier_scale=scale, clip_x0=clip_x0,
            callback=record,
        )  # fmt: skip
        torch.testing.assert_close(ours, guided_ddim_by_hand(toy_start(), scale, clip_x0), rtol=1e-10, atol=1e-10)
    if clip_x0 is not None:  # the guided x̂_0 leaves [−1, 1]: it was not clipped after the shift
        assert any(unclipped)


def test_classifier_guidance_acts_after_clipping():
    """Clipping x̂_0 after the shift instead (the order before issue 16) gives other samples: the
    comparisons above can tell the two orders apart."""
    chain = GaussianDiffusion.from_schedule("linear").respaced(GUIDED_STEPS)
    alpha_bar_train = GaussianDiffusion.from_schedule("linear").alphas_cumprod

    def shifted_first(z, t):
        sigma = (1 - alpha_bar_train[t]).sqrt().reshape(-1, 1)
        return toy_model_output(z, t, False) - 3.0 * sigma * toy_grad(z, t)

    model_fn = lambda z, t: toy_model_output(z, t, False)  # noqa: E731
    ours = sample_ddim(model_fn, chain, toy_start(), grad_log_prob=toy_grad, classifier_scale=3.0, clip_x0=1.0)
    other = sample_ddim(shifted_first, chain, toy_start(), clip_x0=1.0)
    assert (ours - other).abs().max().item() > 1e-3


def test_one_guided_step_in_closed_form():
    """On a respaced learned-range chain: condition_mean adds s·exp(log Σ)·g to μ and nothing else;
    condition_score subtracts s·sqrt(1 − ᾱ_t)·g from ε, with ᾱ_t at the step's training timestep."""
    full = GaussianDiffusion.from_schedule("linear", variance="learned_range")
    chain = full.respaced(250)
    z = toy_start(8)
    t = torch.tensor([1, 1, 2, 3, 10, 100, 200, 249])  # chain steps
    train_t = chain.timesteps[t]
    pred = chain.p_mean_variance(toy_model_output(z, train_t, True), z, t)
    grad = toy_grad(z, train_t)

    by_mean = condition_mean(chain, pred, z, t, grad, 2.0)
    torch.testing.assert_close(by_mean.mean - pred.mean, 2.0 * torch.exp(pred.log_variance) * grad)
    assert torch.equal(by_mean.pred_x0, pred.pred_x0) and torch.equal(by_mean.eps, pred.eps)
    assert torch.equal(by_mean.log_variance, pred.log_variance)

    by_score = condition_score(chain, pred, z, t, grad, 2.0)
    sigma = (1 - full.alphas_cumprod[train_t]).sqrt().reshape(-1, 1)
    torch.testing.assert_close(by_score.eps - pred.eps, -2.0 * sigma * grad)
    x0 = (z - sigma * by_score.eps) / full.alphas_cumprod[train_t].sqrt().reshape(-1, 1)
    torch.testing.assert_close(by_score.pred_x0, x0)
    # The ε shift moves DDPM's mean by s·β_t/sqrt(α_t)·g: up to several times Algorithm 1's s·Σ·g at small t.
    ratio = (by_score.mean - pred.mean) / (by_mean.mean - pred.mean)
    beta, alpha = chain.betas[t].reshape(-1, 1), 1 - chain.betas[t].reshape(-1, 1)
    torch.testing.assert_close(ratio, beta / alpha.sqrt() / torch.exp(pred.log_variance))
    assert ratio[:2].max().item() > 2
