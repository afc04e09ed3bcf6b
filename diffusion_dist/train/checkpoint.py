"""Checkpoints that resume exactly, on any number of ranks and any ZeRO stage, from any fsspec URL.

A checkpoint (format 2) holds the training state as plain tensors and JSON, never pickles:

    state.json                  progress, resolved config, export record, MLflow run, data cursor,
                                EMA and AdamW counters, LR schedule, which tensor file holds what
    tensors-<r>.safetensors     written by rank r: the full fp32 weight, AdamW's exp_avg and
                                exp_avg_sq and the EMA of the parameters r was given (sizes
                                balanced), and rank r's RNG states

The tensors are consolidated (full, whatever the ZeRO stage that trained them), so a job of M
ranks at stage s' resumes a checkpoint of N ranks at stage s: weights, moments, LR schedule,
EMA and step carry over exactly (Engine.load_consolidated). Files go through a CheckpointStore
(train/store.py): each rank writes into a staging directory and uploads; rank 0 commits with a
create-only write listing every file's size and sha256; resume lists the commits, newest first,
checks each file it fetches against its commit and falls back to the previous commit when one
cannot be read on every rank. docs/run-directory.md describes the layout.

Checkpoints written before format 2 (DeepSpeed's own files, shared.pt, rank-<r>.pt and
COMMITTED.json in `step-<N>/`) still resume on the same world size and ZeRO stage.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config, to_dict
from ..data.manifest import DatasetError
from ..data.storage import redact_text, redact_url
from ..data.stream import LatentLoader
from ..distributed import all_ranks_agree, barrier, broadcast_from_rank0, broadcast_tensor, gather_in_order
from ..export import ExportInfo
from .ema import EMA, assemble
from .engine import Engine, UnsafeCheckpoint
from .store import CheckpointStore, CorruptCheckpoint, FileRecord, new_attempt_id
from .tracking import Tracker

log = logging.getLogger(__name__)
FORMAT, VERSION = "diffusion-dist-checkpoint", 2
STATE = "state.json"
# Format 1 (before elastic resume): files inside run.dir/checkpoints/step-<N>/.
LEGACY_COMMIT, LEGACY_SHARED = "COMMITTED.json", "shared.pt"
KINDS = ("weight", "exp_avg", "exp_avg_sq", "ema")  # the tensors kept per parameter


# Fields of the model section added after checkpoints were written, with the value those runs had:
# a checkpoint without them was made by a model with these values.
MODEL_FIELDS_ADDED = {"kind": "unet", "text": False}


class TrainingAborted(RuntimeError):
    """Training cannot go on (too many non-finite steps, a checkpoint from another model or dataset)."""


@dataclass
class Progress:
    """What the step loop has done."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


def tensor_file(rank: int) -> str:
    return f"tensors-{rank:05d}.safetensors"


def checkpoint_url(config: Config) -> str:
    """checkpoint.dir, or run.dir/checkpoints."""
    return config.checkpoint.dir or str(Path(config.run.dir) / "checkpoints")


def committed_steps(url: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """The steps of the committed checkpoints under `url`, newest first (format 1 included)."""
    store = CheckpointStore(url, storage_options)
    legacy = _legacy_checkpoints(Path(url)) if store.local else {}
    return sorted(set(store.committed()) | set(legacy), reverse=True)


def read_export_weights(
    url: str, step: int | None = None, storage_options: dict[str, Any] | None = None, scratch: Path | None = None
) -> tuple[dict[str, torch.Tensor], ExportInfo, dict[str, torch.Tensor] | None]:
    """The EMA weights, export record and (for a text model) null text of a committed checkpoint (the
    newest when step is None), read without DeepSpeed and checked against the commit: what
    launch.export writes out."""
    store = CheckpointStore(url, storage_options)
    legacy = _legacy_checkpoints(Path(url)) if store.local else {}
    steps = committed_steps(url, storage_options)
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(f"{redact_url(url)} holds no committed checkpoint{f' of step {step}' if step else ''}")
    step = steps[0] if step is None else step
    if step in legacy:
        return (*_legacy_export_weights(Path(legacy[step])), None)  # format 1 predates text models
    directory = store.fetch(step, [STATE], scratch or Path("."))
    state = json.loads((directory / STATE).read_text())
    files = sorted(set(state["tensor_files"].values()) | {tensor_file(0)})  # rank 0's holds the null text
    directory = store.fetch(step, files, scratch or Path("."))
    weights, null_text = {}, {}
    for name in files:
        for key, tensor in load_file(directory / name).items():
            kind, _, rest = key.partition("/")
            if kind == "ema":
                weights[rest] = tensor
            elif kind == "null_text":
                null_text[rest] = tensor
    info = ExportInfo.from_dict(state["export"]).replace(step=state["progress"]["step"])
    return weights, info, null_text or None


def _legacy_export_weights(directory: Path) -> tuple[dict[str, torch.Tensor], ExportInfo]:
    """The EMA of a format-1 checkpoint: under ZeRO-3 every rank's slices, reassembled."""
    shared = torch.load(directory / LEGACY_SHARED, map_location="cpu", weights_only=True)
    layout = shared["ema_layout"]
    if layout["partitioned"]:
        ranks = len(list(directory.glob("rank-*.pt")))
        paths = [directory / f"rank-{r:05d}.pt" for r in range(ranks)]
        states = [torch.load(path, map_location="cpu", weights_only=True)["ema"] for path in paths]
    else:
        states = [shared["ema"]]
    info = ExportInfo.from_dict(shared["export"]).replace(step=shared["progress"]["step"])
    return assemble(layout, states), info


class TrainState:
    """The state of a run, saved by `save()` and restored by `resume()` on all ranks together.

    Holds the progress counters; reads and writes the engine (weights, optimizer, LR schedule), the
    EMA, the data cursor, the RNG states and the MLflow run's record (so a resumed job continues it).
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
        self.store = CheckpointStore(checkpoint_url(config), config.checkpoint.storage_options)
        # Staging for stores that are not local: this rank's own, on the node's temporary disk.
        self.scratch = Path(tempfile.gettempdir()) / f"diffusion-dist-{os.getpid()}-rank{rank}"
        self.progress = Progress()
        self.resumed_tracking: dict[str, Any] | None = None  # the MLflow run of the checkpoint resumed from
        self.tracker: Tracker | None = None  # this run's: its state (run id, restarts) goes into every checkpoint
        self.saved_step = -1  # the newest step committed to this run's store

    # Saving.

    def save(self) -> bool:
        """Write, upload and commit a checkpoint of the current step (a collective). False when the
        store could not take it on some rank (out of space, unreachable after retries): nothing is
        committed, a warning says why, and training goes on to the next save."""
        step = self.progress.step
        attempt = broadcast_from_rank0(new_attempt_id())
        staging = self.store.staging_dir(step, attempt, self.scratch)
        started = time.perf_counter()
        records: list[FileRecord] = []
        error = None
        try:
            names = self._write(staging)  # collectives inside: every rank gets here
            records = self.store.upload(step, attempt, staging, names)
        except OSError as e:
            error = _describe(e)
        if not all_ranks_agree(error is None):
            log.warning("step %d: checkpoint not saved (%s); training goes on", step, error or "another rank failed")
            self._clear_scratch()
            return False
        gathered = gather_in_order(records)
        committed = False
        if self.rank == 0:
            try:
                metadata = {"format": FORMAT, "version": VERSION}
                committed = self.store.commit(step, attempt, [r for rank in gathered for r in rank], metadata)
                if committed:
                    self._prune()
            except OSError as e:
                log.warning("step %d: checkpoint not committed (%s); training goes on", step, _describe(e))
        committed = broadcast_from_rank0(committed)
        self._clear_scratch()
        self.saved_step = step if committed else self.saved_step
        if committed and self.rank == 0:
            where = redact_url(f"{checkpoint_url(self.config).rstrip('/')}/step-{step}")
            log.info("step %d: checkpoint %s (%.1f s)", step, where, time.perf_counter() - started)
        return committed

    def _write(self, staging: Path) -> list[str]:
        """This rank's files of the checkpoint in `staging`; their names."""
        staging.mkdir(parents=True, exist_ok=True)
        owners = _owners([shape.numel() for shape in self.ema.shapes], self.world_size)
        tensors: dict[str, torch.Tensor] = {}
        for index, (name, state) in enumerate(self.engine.consolidated()):  # a collective per parameter
            ema = self.ema.full_tensor(index)  # likewise under ZeRO-3
            if owners[index] == self.rank:
                tensors |= {f"{kind}/{name}": value.cpu() for kind, value in {**state, "ema": ema}.items()}
        tensors |= {f"rng/{key}": value for key, value in _rng_state().items()}
        if self.rank == 0 and self.data.null_text is not None:
            # A text model's ∅, so that launch.export needs only the checkpoint.
            tensors |= {f"null_text/{key}": value for key, value in self.data.null_text.items()}
        save_file(tensors, staging / tensor_file(self.rank))
        data = self.data.state_dict()  # the global cursor: the same on every rank
        if self.rank != 0:
            return [tensor_file(self.rank)]
        names = self.ema.names
        state = {
            "format": FORMAT,
            "version": VERSION,
            "progress": asdict(self.progress),
            "config": to_dict(self.config),
            "export": self.export.to_dict(),
            "tracking": self.tracker.state_dict() if self.tracker else self.resumed_tracking,
            "data": data,
            "ema": {"decay": self.ema.decay, "updates": self.ema.updates},
            "optimizer": self.engine.optimizer_state(),
            "world_size": self.world_size,
            "zero_stage": self.engine.zero_stage,
            "tensor_files": {name: tensor_file(owners[i]) for i, name in enumerate(names)},
        }
        (staging / STATE).write_text(json.dumps(state, indent=1))
        return [STATE, tensor_file(0)]

    def _prune(self) -> None:
        """Keep the newest checkpoint.keep checkpoints, format-1 directories counted among them."""
        keep = max(1, self.config.checkpoint.keep)
        legacy = _legacy_checkpoints(Path(checkpoint_url(self.config))) if self.store.local else {}
        newest = sorted(set(self.store.committed()) | set(legacy), reverse=True)[:keep]
        self.store.prune(keep, protect=legacy)
        for step, directory in legacy.items():
            if step not in newest:
                shutil.rmtree(directory, ignore_errors=True)

    def _clear_scratch(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    # Resuming.

    def resume(self, path: str | None = None, fresh: bool = False) -> bool:
        """Load the newest committed checkpoint (or `path`, a step-<N> of the store or a format-1
        directory) on every rank; False if there is none.

        Rank 0 lists the candidates and all ranks try them in order together: ranks never continue
        from different checkpoints, and one that any rank cannot read is skipped by all.
        `fresh` (--no-resume) moves existing checkpoints aside instead.
        """
        if fresh:
            self._set_aside()
            return False
        candidates = broadcast_from_rank0(self._candidates(path) if self.rank == 0 else None)
        if path and not candidates:
            raise TrainingAborted(f"--resume {redact_url(path)}: no committed checkpoint there (see warnings)")
        for url, step, legacy in candidates:
            try:
                if legacy:
                    loaded = self._load_legacy(legacy)
                else:
                    loaded = self._load(CheckpointStore(url, self.config.checkpoint.storage_options), step)
            except (TrainingAborted, DatasetError):  # the same for every checkpoint: no falling back
                raise
            except UnsafeCheckpoint as e:  # tampered: refuse loudly rather than fall back quietly
                raise TrainingAborted(f"{e}; remove it, or resume from another checkpoint with --resume") from None
            except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
                log.warning("cannot resume from step %d (%s); trying an older checkpoint", step, _describe(e))
                loaded = False
            if loaded:
                if url == checkpoint_url(self.config):
                    self.saved_step = self.progress.step  # already in this run's store
                if self.rank == 0:
                    log.info("resumed from step-%d at step %d", step, self.progress.step)
                return True
            if path:
                raise TrainingAborted(f"--resume {redact_url(path)}: the checkpoint cannot be read on every rank")
        if candidates:
            where = redact_url(checkpoint_url(self.config))
            raise TrainingAborted(f"no checkpoint in {where} could be loaded (see warnings); --no-resume starts over")
        return False

    def _candidates(self, path: str | None) -> list[tuple[str, int, str | None]]:
        """(store URL, step, format-1 directory or None) to try, newest first. `path` (--resume) names
        one checkpoint, `<store>/step-<N>` (it may lie in another run's store), or a format-1 directory."""
        if path:
            root, _, name = path.rstrip("/").rpartition("/")
            step = int(name.removeprefix("step-")) if name.removeprefix("step-").isdigit() else -1
            if (Path(path) / LEGACY_SHARED).exists():
                return [(root, step, path)] if not _legacy_problem(Path(path), warn=True) else []
            committed = CheckpointStore(root or ".", self.config.checkpoint.storage_options).committed()
            return [(root or ".", step, None)] if step in committed else []
        url = checkpoint_url(self.config)
        legacy = _legacy_checkpoints(Path(url)) if self.store.local else {}
        steps = {step: None for step in self.store.committed()} | legacy
        return [(url, step, directory) for step, directory in sorted(steps.items(), reverse=True)]

    def _load(self, store: CheckpointStore, step: int) -> bool:
        """Every rank fetches and checks what it reads of step's checkpoint, then all load (a collective)."""
        directory = self.scratch / "resume" / f"step-{step}"
        state = None
        ok, error = True, ""
        try:
            if self.rank == 0:
                state = json.loads((store.fetch(step, [STATE], directory) / STATE).read_text())
                self._check(state)
            state = broadcast_from_rank0(state)
            files = sorted(set(state["tensor_files"].values()))
            mine = [f for i, f in enumerate(files) if i % self.world_size == self.rank]
            if state["world_size"] == self.world_size:  # this rank's RNG states: in its own file
                mine = sorted(set(mine) | {tensor_file(self.rank)})
            directory = store.fetch(step, mine, directory)
        except (OSError, CorruptCheckpoint, KeyError, ValueError) as e:
            ok, error = False, _describe(e)
        if not all_ranks_agree(ok):
            log.warning("cannot read checkpoint step-%d: %s", step, error or "another rank could not")
            return False
        readers = {f: i % self.world_size for i, f in enumerate(files)}
        opened = {f: load_file(directory / f) for f in mine}
        self.engine.load_consolidated(self._tensors(state, readers, opened), state["optimizer"])
        self.ema.updates = int(state["ema"]["updates"])
        self.progress = Progress(**state["progress"])
        self.data.load_state_dict(state["data"], allow_batch_change=self.config.data.allow_batch_change)
        if state["world_size"] == self.world_size:
            _set_rng_state(opened[tensor_file(self.rank)])
        else:  # RNG streams cannot be split across another number of ranks: reseed from (seed, step, rank)
            _reseed(self.config.run.seed, self.progress.step, self.rank)
            if self.rank == 0:
                log.warning(
                    "resuming %d ranks' checkpoint on %d: model dropout draws differ from an uninterrupted run",
                    state["world_size"],
                    self.world_size,
                )
        self.resumed_tracking = state.get("tracking") or {"restarts": 0}
        self._clear_scratch()
        return True

    def _tensors(
        self, state: dict[str, Any], readers: dict[str, int], opened: dict[str, dict[str, torch.Tensor]]
    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(name, {weight, exp_avg, exp_avg_sq}) in module order on every rank: the rank that read a
        parameter's file sends its tensors to the others; the EMA is set on the way."""
        for index, (name, shape) in enumerate(zip(self.ema.names, self.ema.shapes, strict=True)):
            source = state["tensor_files"][name]
            full = {}
            for kind in KINDS:
                local = opened[source][f"{kind}/{name}"] if source in opened else torch.empty(shape)
                full[kind] = broadcast_tensor(local, readers[source])
            self.ema.load_full_tensor(index, full.pop("ema"), self.rank)
            yield name, full

    def _check(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another format, model or dataset, before anything is loaded."""
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} of version {VERSION}")
        if {**MODEL_FIELDS_ADDED, **state["config"]["model"]} != to_dict(self.config)["model"]:
            raise TrainingAborted(
                f"the checkpoint was made by another model ({state['config']['model']}); "
                "use a new run.dir (or checkpoint.dir), or --no-resume to start over"
            )
        _check_dataset(ExportInfo.from_dict(state["export"]), self.export)

    # Format 1.

    def _load_legacy(self, directory: str) -> bool:
        """A checkpoint written before format 2: DeepSpeed's files, on the same world size and stage."""
        directory = Path(directory)
        try:
            shared = torch.load(directory / LEGACY_SHARED, map_location="cpu", weights_only=True)
            ranks = len(list(directory.glob("rank-*.pt")))
            if ranks != self.world_size:
                raise ValueError(f"it was saved by {ranks} ranks and this job has {self.world_size}")
            per_rank = torch.load(directory / f"rank-{self.rank:05d}.pt", map_location="cpu", weights_only=True)
            ok, error = True, ""
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            ok, error = False, _describe(e)
        if not all_ranks_agree(ok):
            log.warning("cannot read checkpoint %s: %s", directory, error or "another rank could not")
            return False
        if {**MODEL_FIELDS_ADDED, **shared["config"]["model"]} != to_dict(self.config)["model"]:
            raise TrainingAborted(
                f"checkpoint {directory} was made by another model ({shared['config']['model']}); "
                "use a new run.dir, or --no-resume to start over"
            )
        _check_dataset(ExportInfo.from_dict(shared["export"]), self.export)
        self.engine.load_legacy(directory)
        self.progress = Progress(**shared["progress"])
        self.ema.load_state_dict(per_rank["ema"] if self.ema.partitioned else shared["ema"])
        torch.set_rng_state(per_rank["rng"]["torch"])
        python = per_rank["rng"]["python"]
        random.setstate((python["version"], tuple(int(x) for x in python["internal"].tolist()), python["gauss"]))
        self.data.load_state_dict(per_rank["data"])  # a format-1 position: the loader starts the next epoch
        self.resumed_tracking = shared.get("tracking") or {"restarts": 0}
        return True

    def _set_aside(self) -> None:
        """--no-resume: move a local checkpoint directory out of the way (never deleted, never pruned as
        newer); on object storage, refuse: its prefixes would mix with the new run's."""
        root = Path(checkpoint_url(self.config))
        if self.rank == 0 and self.store.local and root.exists() and any(root.iterdir()):
            aside = root.with_name(f"{root.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
            root.rename(aside)
            log.warning("--no-resume: moved the previous checkpoints to %s", aside)
        elif self.rank == 0 and not self.store.local and self.store.committed():
            raise TrainingAborted(
                f"--no-resume: {redact_url(checkpoint_url(self.config))} holds checkpoints; "
                "set checkpoint.dir to a new prefix to start over"
            )
        barrier()


def _owners(sizes: list[int], ranks: int) -> list[int]:
    """The rank that writes each parameter: the largest first, each to the least loaded rank."""
    load, owners = [0] * ranks, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = min(range(ranks), key=lambda r: load[r])
        owners[index], load[owner] = owner, load[owner] + sizes[index]
    return owners


def _check_dataset(saved: ExportInfo, current: ExportInfo) -> None:
    """A checkpoint resumes only on latents of its codec and shape: another dataset would change the
    model's input silently. Text encoders compare as text.check_text_encoder does: all but the name."""
    encoder = lambda info: info.text_encoder and {k: v for k, v in info.text_encoder.items() if k != "name"}  # noqa: E731
    for what, theirs, ours in (
        ("codec", saved.codec, current.codec),
        ("latent shape", list(saved.latent_shape), list(current.latent_shape)),
        ("text encoder", encoder(saved), encoder(current)),
    ):
        if theirs != ours:
            raise TrainingAborted(
                f"the checkpoint was trained on latents of another {what} ({theirs}; data.url has {ours}); "
                "resume on the dataset it was trained on, or start a new run.dir"
            )


def _legacy_checkpoints(root: Path) -> dict[int, str]:
    """Format-1 directories under root whose commit marker matches their files."""
    found = {}
    for directory in root.glob("step-*"):
        if (directory / LEGACY_SHARED).exists() and directory.name.removeprefix("step-").isdigit():
            if not _legacy_problem(directory, warn=True):
                found[int(directory.name.removeprefix("step-"))] = str(directory)
    return found


def _legacy_problem(directory: Path, warn: bool = False) -> str | None:
    marker = directory / LEGACY_COMMIT
    problem = None
    if not marker.is_file():
        problem = "no commit marker (a save that did not finish)"
    else:
        try:
            files = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError) as e:
            files, problem = {}, f"unreadable commit marker ({e})"
        for name, size in files.items():
            path = directory / name
            if not path.is_file():
                problem = f"{name} is missing"
            elif path.stat().st_size != size:
                problem = f"{name} has {path.stat().st_size} bytes, the marker says {size}"
    if problem and warn:
        log.warning("ignoring checkpoint %s: %s", directory, problem)
    return problem


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch's CPU (and current CUDA device's) and Python's."""
    version, internal, gauss = random.getstate()
    python = torch.tensor([version, *internal, -1 if gauss is None else 0], dtype=torch.int64)
    states = {"torch": torch.get_rng_state(), "python": python, "python_gauss": torch.tensor([gauss or 0.0])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    python = [int(x) for x in tensors["rng/python"].tolist()]
    gauss = None if python[-1] == -1 else float(tensors["rng/python_gauss"][0])
    random.setstate((python[0], tuple(python[1:-1]), gauss))
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


def _reseed(seed: int, step: int, rank: int) -> None:
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)
    torch.manual_seed(int(state[0] >> 1))
    random.seed(int(state[1]))


def _describe(error: BaseException) -> str:
    """An error for a log line: out-of-space said plainly, URLs without credentials."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on the device holding {getattr(error, 'filename', None) or 'the checkpoint'}"
    return redact_text(str(error))
