"""Discrete-time Gaussian diffusion with ε-prediction (DDPM, improved DDPM / ADM).

Notation of Ho et al. (2020): β_t, α_t = 1 − β_t, ᾱ_t = Π_{s<=t} α_s. Coefficient tables are
computed in float64 and cast to the data's dtype only when applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import get_betas, respace_betas, space_timesteps

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


class Prediction(NamedTuple):
    """The model's reverse step p(z_{t−1} | z_t) and the x̂_0 it implies."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    """A diffusion chain of T steps over data of any shape (N, C, ...).

    variance picks Σ_θ of the reverse step:
      - "fixed_small": the posterior variance β̃_t (Ho et al. 2020, σ_t² = β̃_t);
      - "fixed_large": β_t (σ_t² = β_t);
      - "learned_range": the model outputs 2C channels, [ε, v], and
        Σ_θ = exp(v' log β_t + (1 − v') log β̃_t) with v' = (v + 1) / 2
        (Nichol & Dhariwal 2021, Eq. 15).

    `timesteps[i]` is the training timestep that chain step i corresponds to: the identity
    for a full chain, a strided subset for a respaced one. Models are always called with
    training timesteps.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        variance: str = "fixed_small",
        timesteps: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.variance = variance
        self.num_timesteps = len(betas)
        self.timesteps = (
            torch.arange(self.num_timesteps) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)
        )

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

        # q(z_{t−1} | z_t, x_0) = N(μ̃_t, β̃_t I)  (Ho et al. 2020, Eq. 6-7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0; its log is clipped to β̃_1, as in ADM, so log-variance stays finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if self.num_timesteps > 1 else betas
        )
        # Σ for variance="fixed_large": β_t, except β̃_1 at t = 0 so the decoder variance is
        # not the tiny β_1 (ADM).
        self.large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]]) if self.num_timesteps > 1 else betas
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_schedule(
        cls, schedule: str, num_timesteps: int = 1000, variance: str = "fixed_small"
    ) -> GaussianDiffusion:
        """The full chain of a named schedule (see schedules.SCHEDULES)."""
        return cls(get_betas(schedule, num_timesteps), variance)

    def respaced(self, spacing: str | int | Sequence[int]) -> GaussianDiffusion:
        """A shorter chain on a subset of this chain's steps, for sampling (ADM's SpacedDiffusion)."""
        steps = space_timesteps(self.num_timesteps, spacing)
        return GaussianDiffusion(respace_betas(self.alphas_cumprod, steps), self.variance, self.timesteps[steps])

    @property
    def learn_sigma(self) -> bool:
        """Whether the model outputs variance channels besides ε."""
        return self.variance == "learned_range"

    # Forward process.

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε  (Eq. 4, reparameterised)."""
        return (
            at_timestep(self.sqrt_alphas_cumprod, t, x0) * x0
            + at_timestep(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0_from_eps(self, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (z_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)."""
        return (z_t - at_timestep(self.sqrt_one_minus_alphas_cumprod, t, z_t) * eps) / at_timestep(
            self.sqrt_alphas_cumprod, t, z_t
        )

    def predict_eps_from_x0(self, z_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (z_t − sqrt(ᾱ_t) x_0) / sqrt(1 − ᾱ_t), the inverse of predict_x0_from_eps."""
        return (z_t - at_timestep(self.sqrt_alphas_cumprod, t, z_t) * x0) / at_timestep(
            self.sqrt_one_minus_alphas_cumprod, t, z_t
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(z_{t−1} | z_t, x_0)  (Eq. 6-7)."""
        mean = (
            at_timestep(self.posterior_mean_coef1, t, z_t) * x0 + at_timestep(self.posterior_mean_coef2, t, z_t) * z_t
        )
        return (
            mean,
            at_timestep(self.posterior_variance, t, z_t),
            at_timestep(self.posterior_log_variance_clipped, t, z_t),
        )

    # Reverse process.

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        clip_x0: float | None = None,
    ) -> Prediction:
        """p_θ(z_{t−1} | z_t) from the model's output at z_t: [ε] or, when learned, [ε, v].

        clip_x0 clamps x̂_0 to [−clip_x0, clip_x0] (pixel-space models); latents usually leave it None.
        """
        channels = z_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"learned variance needs {2 * channels} output channels, got {model_output.shape[1]}")
            eps, v = model_output.split(channels, dim=1)
            min_log = at_timestep(self.posterior_log_variance_clipped, t, z_t)
            max_log = at_timestep(self.log_betas, t, z_t)
            frac = (v + 1) / 2  # v in [−1, 1] interpolates between β̃_t and β_t in log space.
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape[1] != channels:
                raise ValueError(f"expected {channels} output channels (ε), got {model_output.shape[1]}")
            eps = model_output
            if self.variance == "fixed_large":
                variance = at_timestep(self.large_variance, t, z_t)
                log_variance = torch.log(variance)
            else:
                variance = at_timestep(self.posterior_variance, t, z_t)
                log_variance = at_timestep(self.posterior_log_variance_clipped, t, z_t)
            variance, log_variance = variance.expand_as(z_t), log_variance.expand_as(z_t)

        pred_x0 = self.predict_x0_from_eps(z_t, t, eps)
        if clip_x0 is not None:
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
            eps = self.predict_eps_from_x0(z_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, z_t, t)
        return Prediction(mean, variance, log_variance, pred_x0, eps)

    # Training objective.

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The variational bound's term L_t per sample, in bits per dimension, shape (N,).

        L_t = KL(q(z_{t−1} | z_t, x_0) || p_θ(z_{t−1} | z_t)) for t > 0 and the discretised
        decoder NLL −log p_θ(x_0 | z_1) for t = 0 (Ho et al. 2020, Eq. 5).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, z_t, t)
        pred = self.p_mean_variance(model_output, z_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, means=pred.mean, log_scales=0.5 * pred.log_variance)
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def loss_terms(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        target_eps: torch.Tensor,
        vlb_weight: float = 0.001,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, each shape (N,): "mse", "vb" and their sum "loss".

        mse = ‖ε − ε_θ‖² averaged over dimensions (L_simple). With learned variance the
        hybrid objective L_simple + λ·L_vlb (Nichol & Dhariwal 2021, Eq. 16) adds
        λ·T·L_t, a one-sample estimate of λ·L_vlb, computed with ε_θ detached so L_vlb
        trains only Σ_θ (their Sec. 3.1). λ = 0.001 gives ADM's and DiT's "mse + vb" at T = 1000.
        """
        channels = z_t.shape[1]
        eps = model_output[:, :channels]
        mse = mean_flat((target_eps - eps) ** 2)
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, z_t, t) * (vlb_weight * self.num_timesteps)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def at_timestep(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (N, 1, ..., 1) to broadcast against `like`, in `like`'s dtype and device."""
    values = table.to(t.device)[t].to(dtype=like.dtype, device=like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))
