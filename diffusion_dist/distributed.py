"""Where this process sits in the job: rank and world size from torchrun, SLURM or neither.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; under `srun` SLURM sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node
list, whose first host is the master. Without either, the job is one process.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def process_from_env(env: Mapping[str, str] | None = None) -> ProcessInfo:
    """This process's place in the job, from the launcher's environment variables."""
    env = os.environ if env is None else env
    if env.get("RANK") and env.get("WORLD_SIZE"):
        return ProcessInfo(
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else 0,
            env.get("MASTER_ADDR", "127.0.0.1"),
            _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 29500,
            "torchrun",
        )
    # Inside srun, SLURM_STEP_NUM_TASKS counts this step's tasks; in a batch script without srun
    # the step has one task, however many the job asked for.
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if env.get("SLURM_PROCID") and tasks:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        # A port derived from the job id: all tasks agree without talking, and two jobs
        # sharing a node do not collide.
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return ProcessInfo(
            _int(env, "SLURM_PROCID"),
            int(tasks),
            _int(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0,
            env.get("MASTER_ADDR") or first_host(nodelist),
            port,
            "slurm",
        )
    return ProcessInfo(0, 1, 0, "127.0.0.1", _free_port(), "single")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def init_process_group(process: ProcessInfo, device: torch.device) -> None:
    """Start torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    os.environ.update(
        RANK=str(process.rank),
        WORLD_SIZE=str(process.world_size),
        LOCAL_RANK=str(process.local_rank),
        MASTER_ADDR=process.master_addr,
        MASTER_PORT=str(process.master_port),
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
