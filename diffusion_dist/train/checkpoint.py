"""Checkpoints that resume exactly: everything the next step depends on, a commit marker written last.

`run.dir/checkpoints/step-<N>/` holds DeepSpeed's files (model, optimizer partitions, LR
schedule), `shared.pt` (progress, resolved config, export record, EMA, MLflow run: what all
ranks share) and one `rank-<r>.pt` per rank (data position, RNG states, EMA slice under ZeRO-3).
Our files hold only tensors and plain data, so they load with weights_only=True. After every
rank has written, rank 0 writes `COMMITTED.json` listing each file with its size. Only
directories whose marker matches the files on disk count: a save killed midway, or a file
damaged since, is skipped in favour of the previous one. DeepSpeed's own `latest` file is
never written or read. docs/run-directory.md describes the layout.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, to_dict
from ..data.storage import atomic_file
from ..data.stream import LatentLoader
from ..distributed import all_ranks_agree, barrier, broadcast_from_rank0
from ..export import ExportInfo
from .ema import EMA
from .engine import Engine
from .tracking import Tracker

log = logging.getLogger(__name__)
COMMIT, SHARED = "COMMITTED.json", "shared.pt"


class TrainingAborted(RuntimeError):
    """Training cannot go on (too many non-finite steps, a checkpoint from another model)."""


@dataclass
class Progress:
    """What the step loop has done."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.pt"


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


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


class TrainState:
    """The state of a run, saved by `save()` and restored by `resume()` on all ranks together.

    Holds the progress counters; reads and writes the engine (weights, optimizer, LR schedule), the
    EMA, the data position, the RNG states and the MLflow run's record (so a resumed job continues it).
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        ema: EMA,
        data: LatentLoader,
        export: ExportInfo,
        rank: int,
        world_size: int,
    ) -> None:
        self.config, self.engine, self.ema, self.data, self.export = config, engine, ema, data, export
        self.rank, self.world_size = rank, world_size
        self.root = Path(config.run.dir) / "checkpoints"
        self.progress = Progress()
        self.resumed_tracking: dict[str, Any] | None = None  # the MLflow run of the checkpoint resumed from
        self.tracker: Tracker | None = None  # this run's: its state (run id, restarts) goes into every checkpoint

    def save(self) -> Path:
        """Write a checkpoint of the current step and commit it (a collective). Returns its directory."""
        step = self.progress.step
        directory = self.root / f"step-{step}"
        if self.rank == 0 and directory.exists():
            shutil.rmtree(directory)  # a partial save of this step from a killed run
        barrier()
        self.engine.save(directory)
        if self.rank == 0:
            _save(self._shared_state(), directory / SHARED)
        _save(self._rank_state(), rank_file(directory, self.rank))
        barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            missing = [r for r in range(self.world_size) if not rank_file(directory, r).is_file()]
            if missing:
                raise RuntimeError(f"{directory}: ranks {missing} did not write their state; not committing")
            files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
            with atomic_file(directory / COMMIT) as temporary:
                temporary.write_text(json.dumps({"step": step, "files": files}, indent=1))
            self._prune()
            log.info("step %d: checkpoint %s", step, directory)
        barrier()
        return directory

    def resume(self, path: str | None = None, fresh: bool = False) -> bool:
        """Load the newest committed checkpoint (or `path`) on every rank; False if there is none.

        Rank 0 lists the candidates and all ranks try them in order together: ranks never continue
        from different checkpoints, and one that any rank cannot read is skipped by all.
        `fresh` (--no-resume) moves existing checkpoints aside instead.
        """
        if fresh:
            self._set_aside()
            return False
        candidates = [Path(path)] if path else broadcast_from_rank0(committed_checkpoints(self.root))
        for directory in candidates:
            try:
                shared = load_state(directory / SHARED)
                per_rank = self._load_rank_state(directory)
                ok = True
            except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
                log.warning("cannot read checkpoint %s (%s)", directory, e)
                ok = False
            if not all_ranks_agree(ok):
                if path:
                    raise TrainingAborted(f"checkpoint {path} cannot be read on every rank (see warnings)")
                continue
            if {"kind": "unet", **shared["config"]["model"]} != to_dict(self.config)["model"]:  # kind: added later
                raise TrainingAborted(
                    f"checkpoint {directory} was made by another model ({shared['config']['model']}); "
                    "use a new run.dir, or --no-resume to start over"
                )
            self.engine.load(directory)
            self._load(shared, per_rank)
            if self.rank == 0:
                log.info("resumed from %s at step %d", directory, self.progress.step)
            return True
        if candidates:
            raise TrainingAborted(
                f"no checkpoint in {self.root} could be loaded (see warnings); --no-resume starts over"
            )
        return False

    def _shared_state(self) -> dict[str, Any]:
        shared = {
            "progress": asdict(self.progress),
            "config": to_dict(self.config),
            "tracking": self.tracker.state_dict() if self.tracker else self.resumed_tracking,
            "export": self.export.to_dict(),
            "ema_layout": self.ema.layout(),
        }
        if not self.ema.partitioned:
            shared["ema"] = self.ema.state_dict()
        return shared

    def _rank_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": _python_rng_tensor(random.getstate())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        state: dict[str, Any] = {"data": self.data.state_dict(), "rng": rng}
        if self.ema.partitioned:
            state["ema"] = self.ema.state_dict()
        return state

    def _load(self, shared: dict[str, Any], per_rank: dict[str, Any]) -> None:
        self.progress = Progress(**shared["progress"])
        self.data.load_state_dict(per_rank["data"])
        self.ema.load_state_dict(per_rank["ema"] if self.ema.partitioned else shared["ema"])
        torch.set_rng_state(per_rank["rng"]["torch"])
        random.setstate(_python_rng_state(per_rank["rng"]["python"]))
        if "cuda" in per_rank["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(per_rank["rng"]["cuda"])
        self.resumed_tracking = shared.get("tracking") or {"restarts": 0}

    def _load_rank_state(self, directory: Path) -> dict[str, Any]:
        """This rank's state in `directory` (checked to come from a job of this world size)."""
        ranks = len(list(directory.glob("rank-*.pt")))
        if ranks != self.world_size:
            raise ValueError(
                f"{directory} was saved by {ranks} ranks and this job has {self.world_size}; "
                "resume with the same number of ranks"
            )
        return load_state(rank_file(directory, self.rank))

    def _prune(self) -> None:
        """Keep the newest `checkpoint.keep` committed checkpoints (never fewer than the newest one);
        remove uncommitted leftovers older than the newest (saves that were killed)."""
        committed = committed_checkpoints(self.root)
        for old in committed[max(1, self.config.checkpoint.keep) :]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob("step-*"):
            if leftover not in committed and leftover.is_dir() and step_of(leftover) < step_of(committed[0]):
                shutil.rmtree(leftover, ignore_errors=True)

    def _set_aside(self) -> None:
        """--no-resume: move existing checkpoints out of the way (never deleted, never pruned as newer)."""
        if self.rank == 0 and self.root.exists() and any(self.root.glob("step-*")):
            aside = self.root.with_name(f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}")
            self.root.rename(aside)
            log.warning("--no-resume: moved the previous checkpoints to %s", aside)
        barrier()


def _save(state: dict[str, Any], path: Path) -> None:
    with atomic_file(path) as temporary:
        torch.save(state, temporary)


def _python_rng_tensor(state: tuple) -> dict[str, Any]:
    """random.getstate() as tensors and ints, so the checkpoint loads with weights_only=True."""
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_state(saved: dict[str, Any]) -> tuple:
    return saved["version"], tuple(int(x) for x in saved["internal"].tolist()), saved["gauss"]
