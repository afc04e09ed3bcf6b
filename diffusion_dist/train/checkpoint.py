"""Checkpoints that resume exactly: DeepSpeed state + per-rank state, a commit marker written last.

`run.dir/checkpoints/step-<N>/` holds DeepSpeed's files (model, optimizer partitions, LR
schedule), `shared.pt` (step, resolved config, EMA, tracking run id: what all ranks share)
and one `rank-<r>.pt` per rank (data position, RNG states, EMA slice under ZeRO-3). Our
files hold only tensors and plain data, so they load with weights_only=True. After every
rank has written, rank 0 writes `COMMITTED.json` listing each file with its size. Only
directories whose marker matches the files on disk count: a save killed midway, or a file
damaged since, is skipped in favour of the previous one. DeepSpeed's own `latest` file is
never written or read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
COMMIT = "COMMITTED.json"


SHARED = "shared.pt"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.pt"


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    temporary = path.with_suffix(".partial")
    torch.save(state, temporary)
    os.replace(temporary, path)


def step_of(directory: Path) -> int:
    return int(directory.name.removeprefix("step-"))


def committed_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories whose commit marker matches their files, newest first."""
    found = []
    candidates = sorted(
        (p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()),
        key=step_of,
        reverse=True,
    )
    for directory in candidates:
        problem = _verify(directory)
        if problem:
            log.warning("ignoring checkpoint %s: %s", directory, problem)
        else:
            found.append(directory)
    return found


def _verify(directory: Path) -> str | None:
    marker = directory / COMMIT
    if not marker.is_file():
        return "no commit marker (a save that did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable commit marker ({e})"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker says {size}"
    return None


class Checkpointer:
    """Saves, finds, loads and prunes checkpoints under run.dir/checkpoints."""

    def __init__(self, run_dir: str | Path, keep: int, rank: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank = keep, rank

    def save(self, engine, step: int, shared: dict[str, Any], per_rank: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the committed directory."""
        directory = self.root / f"step-{step}"
        if self.rank == 0 and directory.exists():
            shutil.rmtree(directory)  # a partial save of this step from a killed run
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=directory.name, save_latest=False)
        if self.rank == 0:
            _save_atomic(shared, directory / SHARED)
        _save_atomic(per_rank, rank_file(directory, self.rank))
        dist.barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            missing = [r for r in range(dist.get_world_size()) if not rank_file(directory, r).is_file()]
            if missing:
                raise RuntimeError(f"{directory}: ranks {missing} did not write their state; not committing")
            files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
            marker = directory / (COMMIT + ".partial")
            marker.write_text(json.dumps({"step": step, "files": files}, indent=1))
            os.replace(marker, directory / COMMIT)
            self._prune()
        dist.barrier()
        return directory

    def _prune(self) -> None:
        """Keep the newest `keep` committed checkpoints (never fewer than the newest one); remove
        uncommitted leftovers older than the newest (saves that were killed)."""
        committed = committed_checkpoints(self.root)
        for old in committed[max(1, self.keep) :]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob("step-*"):
            if leftover not in committed and leftover.is_dir() and step_of(leftover) < step_of(committed[0]):
                shutil.rmtree(leftover, ignore_errors=True)

    def load_rank_state(self, directory: Path) -> dict[str, Any]:
        """This rank's state in `directory` (checked to come from a job of this world size)."""
        ranks = len(list(directory.glob("rank-*.pt")))
        if ranks != dist.get_world_size():
            raise ValueError(
                f"{directory} was saved by {ranks} ranks and this job has {dist.get_world_size()}; "
                "resume with the same number of ranks"
            )
        return load_state(rank_file(directory, self.rank))

    def load_engine(self, engine, directory: Path) -> None:
        """DeepSpeed's model, optimizer and LR-schedule state (a collective)."""
        path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {directory}")

    def set_aside(self) -> None:
        """--no-resume: move existing checkpoints out of the way (never deleted, never pruned as newer)."""
        if self.rank == 0 and self.root.exists() and any(self.root.glob("step-*")):
            aside = self.root.with_name(f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}")
            self.root.rename(aside)
            log.warning("--no-resume: moved the previous checkpoints to %s", aside)
        dist.barrier()
