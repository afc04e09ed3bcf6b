"""Where this process sits in the job: rank and world size from torchrun, SLURM or neither."""

from __future__ import annotations

import os
from collections.abc import Mapping


def world_size_from_env(env: Mapping[str, str] | None = None) -> int:
    """Number of ranks the launcher started: torchrun's WORLD_SIZE, else SLURM_NTASKS, else 1."""
    env = os.environ if env is None else env
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(name):
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return 1
