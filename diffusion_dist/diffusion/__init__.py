"""Pure diffusion math over tensors: schedules, the Gaussian chain, the loss, samplers, guidance.

Knows nothing of files, ranks, DeepSpeed or configs.
"""

from .gaussian import VARIANCES, GaussianDiffusion, Prediction
from .losses import (
    classifier_draws,
    classifier_loss,
    diffusion_draws,
    diffusion_loss,
    drop_labels,
    timestep_quartile_sums,
)
from .sampling import (
    SAMPLERS,
    classifier_free_guidance,
    classifier_grad,
    condition_mean,
    condition_score,
    conditional,
    ddim_step,
    ddpm_step,
    generate,
    sample_ddim,
    sample_ddpm,
)
from .schedules import SCHEDULES, get_betas, respace_betas, space_timesteps

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "VARIANCES",
    "GaussianDiffusion",
    "Prediction",
    "classifier_free_guidance",
    "classifier_draws",
    "classifier_grad",
    "classifier_loss",
    "condition_mean",
    "condition_score",
    "conditional",
    "ddim_step",
    "ddpm_step",
    "diffusion_draws",
    "diffusion_loss",
    "drop_labels",
    "generate",
    "get_betas",
    "respace_betas",
    "sample_ddim",
    "sample_ddpm",
    "space_timesteps",
    "timestep_quartile_sums",
]
