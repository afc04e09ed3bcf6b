"""Where this process sits in the job, and the few collectives the rest of the code needs.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; under `srun` SLURM sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node
list, whose first host is the master. Without either, the job is one process. The collectives
below work without a process group too (one process), so callers need no special case.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def init_process_group(process: ProcessInfo, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the job's process group: NCCL on GPUs, gloo on CPU (DeepSpeed adopts it as it is).

    `timeout_s` bounds every collective of the default group and of cpu_group() (torch's default:
    30 min for gloo, 10 min for NCCL); NCCL turns an expired one into an error only with
    TORCH_NCCL_ASYNC_ERROR_HANDLING set (slurm/train.sh sets it).
    """
    global _TIMEOUT
    if timeout_s is not None:
        _TIMEOUT = timedelta(seconds=timeout_s)
    os.environ.update(
        RANK=str(process.rank),
        WORLD_SIZE=str(process.world_size),
        LOCAL_RANK=str(process.local_rank),
        MASTER_ADDR=process.master_addr,
        MASTER_PORT=str(process.master_port),
    )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=process.rank, world_size=process.world_size, timeout=_TIMEOUT)


def distributed() -> bool:
    """True when a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def end_process_group() -> None:
    """Leave the process group (after a final barrier where ranks must end together)."""
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank if `ok` is true on every rank (a collective)."""
    if not distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    group = None if dist.get_backend() == "gloo" else cpu_group()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a collective)."""
    return not all_ranks_agree(not flag)


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's picklable `value` on every rank (a collective; the others pass anything)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_in_order(value: Any) -> list[Any] | None:
    """Every rank's picklable `value`, in rank order, on rank 0; None elsewhere (a collective)."""
    if not distributed():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_tensor(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (the others pass one of the same shape and dtype; a collective).
    Returned on the CPU; with NCCL it travels through the current GPU."""
    if not distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    moved = tensor.to(device).contiguous()
    dist.broadcast(moved, src=src)
    return moved.cpu()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks, as a new tensor (a collective)."""
    total = tensor.clone()
    if distributed():
        dist.all_reduce(total)
    return total


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's equally shaped `tensor` concatenated along dim 0 in rank order, on every rank."""
    if not distributed():
        return tensor.clone()
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor)
    return torch.cat(pieces)


_CPU_GROUP: Any = None
_TIMEOUT: timedelta | None = None  # init_process_group's timeout_s; None: torch's default


def cpu_group() -> Any:
    """A gloo group over all ranks, for small host-side agreements without waiting on the GPU queue
    (made at the first call, which is a collective: every rank must make it at the same point)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return _CPU_GROUP


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
