"""Noise schedules β_1..β_T and timestep respacing, in float64."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SCHEDULES = ("linear", "cosine", "scaled_linear")


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4): 1e-4 to 0.02 for T = 1000.

    The end points are scaled by 1000 / T so other T keep the same total noise (ADM).
    """
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, Eq. 17).

    ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2); β_t = 1 − ᾱ(t)/ᾱ(t−1), clipped at max_beta
    to avoid the singularity at t = T.
    """
    return betas_from_alpha_bar(num_timesteps, lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2, max_beta)


def scaled_linear_betas(num_timesteps: int) -> torch.Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022): linear in sqrt(β), 0.00085 to 0.012."""
    return torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_from_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """Discretise a continuous ᾱ(u), u in [0, 1], into T betas."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


_SCHEDULE_FNS = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}


def get_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """The named schedule's betas, shape (T,), float64."""
    if schedule not in _SCHEDULE_FNS:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return _SCHEDULE_FNS[schedule](num_timesteps)


def space_timesteps(num_timesteps: int, spacing: str | int | Sequence[int]) -> list[int]:
    """The subset of the T training timesteps that a respaced sampler visits, ascending.

    `spacing` follows ADM (Nichol & Dhariwal 2021, Sec. 4): an int or "N" takes N steps as
    evenly strided as possible; "ddimN" takes 0, k, 2k, ... with the smallest stride k that
    gives exactly N steps (improved-diffusion's rule; k = T / N when N divides T, as in the
    DDIM paper and diffusers' "leading" spacing); "10,15,20" splits [0, T) into equal
    sections and takes that many steps from each. A sequence of ints is used as given.
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        count = int(spacing[len("ddim") :])
        # range(0, T, k) has ceil(T / k) steps, N exactly when T / N <= k < T / (N − 1): the
        # smallest such k is ceil(T / N), if it is below T / (N − 1).
        stride = -(-num_timesteps // max(count, 1))
        if count < 1 or len(range(0, num_timesteps, stride)) != count:
            raise ValueError(f"ddim spacing: no integer stride gives exactly {count} of {num_timesteps} timesteps")
        return list(range(0, num_timesteps, stride))
    if isinstance(spacing, (list, tuple)):
        steps = sorted(set(int(t) for t in spacing))
        if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {spacing}")
        return steps
    counts = [int(c) for c in str(spacing).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return steps


def respace_betas(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """Betas of the shorter chain that visits only `timesteps` with the same ᾱ there.

    β'_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}} (ᾱ before the first step is 1), so q(z_{t_i} | x_0) is
    unchanged and a model trained on the full chain serves the short one.
    """
    alpha_bar = alphas_cumprod[list(timesteps)]
    previous = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1 - alpha_bar / previous
