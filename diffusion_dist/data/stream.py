"""The trainer's input: latents streamed from shards, deterministic, resumable, equal across ranks.

Each rank runs `num_workers` DataLoader workers (or reads in-process with 0); every
(rank, worker) pair is a *slot* that reads its own shards. Per epoch:

1. Plan. A permutation of the shard list seeded by (seed, epoch) is dealt shard by shard
   to the slot holding the fewest samples, so slot sizes differ by at most one shard.
   Every slot then yields the same number of batches, floor(smallest slot / batch size),
   so no rank waits for another at the end of an epoch. The documented remainder: each
   slot leaves out fewer than (largest shard + batch size) samples per epoch, different
   ones each epoch; every other sample is read exactly once per epoch across the job.
2. Read. A slot reads its shards in groups of `shuffle_shards`, each shard with one GET,
   the next group prefetched in a background thread, and yields the group's samples in a
   permutation seeded by (seed, epoch, slot, group), which mixes several shards.
3. Decode. Per batch, a generator seeded by (seed, epoch, slot, batch) draws the flip
   choice (when flips are stored) and ε for z = mean + exp(logvar / 2)·ε from the stored
   moments; latents are then scaled with the manifest's (z − shift)·scaling.

Order and noise are pure functions of (seed, epoch, shard list, rank, worker, batch size).
A slot's position is (epoch, batch, pass, group, offset); the loader's state is every
slot's position plus which worker comes next, so resuming skips straight to the current
group of each slot: consumed shards are not read again, and of the current group only the
unconsumed samples are decoded.

A missing or corrupt shard is skipped with a warning and a count (strict: an error naming
it); a slot that runs short fills its quota from a second pass over its own shards, so
batch counts stay equal and nothing hangs.
"""

from __future__ import annotations

import atexit
import hashlib
import heapq
import logging
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import DatasetError, load_manifest
from .shards import CorruptShard, NpyReader, read_shard
from .storage import filesystem, join, redact_text, redact_url

log = logging.getLogger(__name__)


class LatentBatch(NamedTuple):
    latents: torch.Tensor  # (B, C, H, W) float32, scaled for the diffusion model
    labels: torch.Tensor  # (B,) int64; the null label for unlabelled samples
    keys: list[str]  # the samples' __key__, in batch order
    epoch: int
    seed: int  # for the batch's own draws downstream (the loss's t, ε): keyed to the batch, not the rank


@dataclass(frozen=True)
class Position:
    """Where a slot stands: the next batch of `epoch`, and the next sample of its reading order."""

    epoch: int = 0
    batch: int = 0  # batches this slot has yielded in `epoch`
    pass_: int = 0  # passes over the slot's shards (> 0 only when skipped shards left it short)
    group: int = 0  # index of the shard group being read
    offset: int = 0  # samples of that group's permutation already consumed


def epoch_plan(shard_samples: tuple[int, ...], num_slots: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per slot: a seeded permutation dealt greedily to the slot with the fewest samples."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_samples))
    heap = [(0, slot) for slot in range(num_slots)]
    plan: list[list[int]] = [[] for _ in range(num_slots)]
    for shard in order:
        samples, slot = heapq.heappop(heap)
        plan[slot].append(int(shard))
        heapq.heappush(heap, (samples + shard_samples[shard], slot))
    return plan


def batches_per_slot(plan: list[list[int]], shard_samples: tuple[int, ...], batch_size: int) -> int:
    """The batches every slot yields in an epoch: what the smallest slot can fill."""
    return min(sum(shard_samples[s] for s in shards) for shards in plan) // batch_size


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


class DatasetInfo(NamedTuple):
    """What a slot needs from the manifest, small enough to pickle into workers."""

    url: str
    storage_options: Mapping[str, Any]
    shard_names: tuple[str, ...]
    shard_samples: tuple[int, ...]
    shard_bytes: tuple[int, ...]
    moments: bool
    flip: bool
    labelled: bool
    scaling_factor: float
    shift_factor: float


class SlotStream:
    """One slot's batches, epoch after epoch, from a starting position. Runs inside its worker."""

    def __init__(
        self,
        info: DatasetInfo,
        slot: int,
        num_slots: int,
        batch_size: int,
        seed: int,
        null_label: int,
        shuffle_shards: int,
        strict: bool,
    ) -> None:
        self.info, self.slot, self.num_slots = info, slot, num_slots
        self.batch_size, self.seed, self.null_label = batch_size, seed, null_label
        self.shuffle_shards, self.strict = shuffle_shards, strict
        self.read_npy = NpyReader()
        self.fs, self.root = filesystem(info.url, info.storage_options)  # created in this process
        self.skipped: list[str] = []  # shards skipped in groups consumed since the last batch

    @lru_cache(maxsize=2)  # noqa: B019 - one stream per worker, two epochs at most
    def plan(self, epoch: int) -> tuple[list[int], int]:
        """This slot's shards in reading order, and the batches every slot yields, in `epoch`."""
        plan = epoch_plan(self.info.shard_samples, self.num_slots, self.seed, epoch)
        return plan[self.slot], batches_per_slot(plan, self.info.shard_samples, self.batch_size)

    def batches(self, start: Position) -> Iterator[tuple[LatentBatch, Position]]:
        position = start
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as prefetch:
            while True:
                epoch = position.epoch
                shards, per_epoch = self.plan(epoch)
                samples = self._samples(epoch, shards, position, prefetch)
                for batch in range(position.batch, per_epoch):
                    chunk = [next(samples) for _ in range(self.batch_size)]
                    after = chunk[-1][1]
                    yield self._decode(epoch, batch, [s for s, _ in chunk]), Position(epoch, batch + 1, *after)
                samples.close()
                position = Position(epoch + 1)

    def _samples(
        self, epoch: int, shards: list[int], start: Position, prefetch: ThreadPoolExecutor
    ) -> Iterator[tuple[dict[str, Any], tuple[int, int, int]]]:
        """(sample, position after it) in reading order, from `start`, over as many passes as needed."""
        groups = [shards[i : i + self.shuffle_shards] for i in range(0, len(shards), self.shuffle_shards)]
        pass_, group, offset = start.pass_, start.group, start.offset
        if group >= len(groups):
            pass_, group, offset = pass_ + 1, 0, 0
        found_any = group != 0  # a pass resumed midway had samples before the resume
        unreadable: set[int] = set()  # this epoch's bad shards: later passes do not read them again
        pending: Future | None = None
        while True:
            samples, skipped = pending.result() if pending else self._read_group(groups[group], unreadable)
            self.skipped += skipped  # counted when consumed, so a discarded prefetch counts nothing
            following = (pass_, group + 1) if group + 1 < len(groups) else (pass_ + 1, 0)
            # Prefetch within this pass only: another pass is needed only when shards were skipped.
            pending = (
                prefetch.submit(self._read_group, groups[group + 1], unreadable) if following[0] == pass_ else None
            )
            found_any = found_any or bool(samples)
            order = np.random.default_rng(_seed(self.seed, epoch, self.slot, pass_, group)).permutation(len(samples))
            for i in range(offset, len(order)):
                after = (pass_, group, i + 1) if i + 1 < len(order) else (*following, 0)
                yield samples[order[i]], after
            if following[0] != pass_:
                if not found_any:
                    raise DatasetError(f"slot {self.slot}: none of its {len(shards)} shards can be read (see warnings)")
                found_any = False
            (pass_, group), offset = following, 0

    def _read_group(self, shards: list[int], unreadable: set[int]) -> tuple[list[dict[str, Any]], list[str]]:
        """The samples of a group's readable shards, and the names of those skipped."""
        samples, skipped = [], []
        for shard in shards:
            if shard in unreadable:
                continue
            try:
                samples.extend(self._read_shard(shard))
            except DatasetError:
                raise
            except (OSError, CorruptShard) as e:
                name = self.info.shard_names[shard]
                url, reason = redact_url(join(self.info.url, name)), redact_text(str(e)) or type(e).__name__
                if self.strict:
                    raise DatasetError(f"shard {url} cannot be read: {reason} (strict mode)") from None
                log.warning("skipping shard %s: %s", url, reason)
                skipped.append(name)
                unreadable.add(shard)
        return samples, skipped

    def _read_shard(self, shard: int) -> list[dict[str, Any]]:
        """A shard's samples, checked against the manifest: bytes, sample count, required members."""
        entry = {
            "name": self.info.shard_names[shard],
            "bytes": self.info.shard_bytes[shard],
            "samples": self.info.shard_samples[shard],
        }
        return read_shard(
            self.fs, self.root, entry, ("latent.npy", "latent_flip.npy") if self.info.flip else ("latent.npy",)
        )

    def _decode(self, epoch: int, batch: int, samples: list[dict[str, Any]]) -> LatentBatch:
        generator = torch.Generator().manual_seed(_seed(self.seed, epoch, self.slot, batch))
        flips = (
            (torch.rand(len(samples), generator=generator) < 0.5).tolist() if self.info.flip else [False] * len(samples)
        )
        members = ["latent_flip.npy" if flip else "latent.npy" for flip in flips]
        stored = torch.from_numpy(
            self.read_npy.stack([s[m] for s, m in zip(samples, members, strict=True)])
        ).float()  # (B, 2C, H, W) moments or (B, C, H, W) samples
        shape = (len(samples), stored.shape[1] // 2 if self.info.moments else stored.shape[1], *stored.shape[2:])
        # In a worker, write the result straight into shared memory: DataLoader then passes a
        # handle instead of copying the batch into a shared segment itself.
        latents = torch.empty(shape)
        if get_worker_info() is not None:
            latents.share_memory_()
        scale, shift = self.info.scaling_factor, self.info.shift_factor
        if self.info.moments:
            # (mean + std·ε − shift)·scale = ε·(std·scale) + (mean − shift)·scale, std = exp(logvar / 2)
            mean, log_variance = stored.chunk(2, dim=1)
            torch.randn(shape, generator=generator, out=latents)
            latents.mul_(torch.exp(0.5 * log_variance + math.log(scale))).add_((mean - shift).mul_(scale))
        else:
            torch.sub(stored, shift, out=latents).mul_(scale)
        if self.info.labelled:
            labels = [int(bytes(s["cls"])) if "cls" in s else self.null_label for s in samples]
        else:
            labels = [self.null_label] * len(samples)
        keys = [s["__key__"] for s in samples]
        loss_seed = _seed(self.seed, epoch, self.slot, batch, 1)
        return LatentBatch(latents, torch.tensor(labels, dtype=torch.long), keys, epoch, loss_seed)


class _Batch(NamedTuple):
    """What a worker sends: the batch, which slot made it, its position after, and shards it skipped."""

    batch: LatentBatch
    local_slot: int
    position: Position
    skipped: list[str]


class _RankStream(IterableDataset):
    """The DataLoader-facing dataset of one rank: worker w serves local slot (w + rotation) mod W."""

    def __init__(self, loader: LatentLoader, starts: list[Position], rotation: int) -> None:
        self.loader, self.starts, self.rotation = loader, starts, rotation

    def __iter__(self) -> Iterator[_Batch]:
        worker = get_worker_info()
        local = ((worker.id if worker else 0) + self.rotation) % self.loader.slots_per_rank
        stream = self.loader.slot_stream(local)
        for batch, position in stream.batches(self.starts[local]):
            skipped, stream.skipped = stream.skipped, []
            # Labels travel as a list: a tensor would cost a shared-memory segment of its own.
            yield _Batch(batch._replace(labels=batch.labels.tolist()), local, position, skipped)


class LatentLoader:
    """Batches of (latents, labels) for one rank, endlessly over epochs, with exact resume.

    The manifest is read and checked here, before any worker starts: a missing or invalid
    manifest, an empty dataset, labels beyond the model's classes, or too few samples for
    every slot to fill one batch are errors that say what to do.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int,
        null_label: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_shards: int = 4,
        strict: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.manifest = load_manifest(url, storage_options)
        where = redact_url(url)
        shards = self.manifest["shards"]
        if self.manifest["num_samples"] == 0:
            raise DatasetError(f"{where}: the dataset has no samples")
        labels = self.manifest.get("labels") or {}
        # null_label = 0 is an unconditional model: its batches carry ∅ whatever the dataset's labels.
        labelled = bool(labels.get("labelled")) and null_label > 0
        if labelled and labels.get("num_classes", 0) > null_label:
            raise DatasetError(
                f"{where}: labels go up to {labels['num_classes'] - 1} but the model has {null_label} classes; "
                f"set model.num_classes >= {labels['num_classes']} (or 0 for an unconditional model)"
            )
        latent, codec = self.manifest["latent"], self.manifest["codec"]
        self.info = DatasetInfo(
            url=url,
            storage_options=dict(storage_options or {}),
            shard_names=tuple(s["name"] for s in shards),
            shard_samples=tuple(s["samples"] for s in shards),
            shard_bytes=tuple(s["bytes"] for s in shards),
            moments=bool(latent["moments"]),
            flip=bool(latent.get("flip")),
            labelled=labelled,
            scaling_factor=float(codec["scaling_factor"]),
            shift_factor=float(codec.get("shift_factor") or 0.0),
        )
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.slots_per_rank = max(1, num_workers)
        self.num_slots = world_size * self.slots_per_rank
        self.batch_size, self.seed, self.null_label = batch_size, seed, null_label
        self.shuffle_shards, self.strict, self.pin_memory = shuffle_shards, strict, pin_memory
        if self.batches_per_epoch(0) == 0:
            raise DatasetError(
                f"{where}: {self.manifest['num_samples']} samples in {len(shards)} shards cannot give each of "
                f"{self.num_slots} readers (world size {world_size} × {self.slots_per_rank} workers) a batch of "
                f"{batch_size}; use fewer data workers, a smaller batch, or re-encode with smaller shards"
            )
        self.positions = [Position() for _ in range(self.slots_per_rank)]
        self.batches_consumed = 0
        self.skipped_shards = 0

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the latents this loader yields."""
        shape = tuple(self.manifest["latent"]["shape"])
        return (shape[0] // 2, *shape[1:]) if self.info.moments else shape

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        position = self.positions[self.batches_consumed % self.slots_per_rank]
        return position.epoch + (position.batch >= self.batches_per_epoch(position.epoch))

    @lru_cache(maxsize=4)  # noqa: B019 - a few loaders per process, a few epochs each
    def batches_per_epoch(self, epoch: int) -> int:
        """Batches this rank yields in `epoch` (the same on every rank)."""
        plan = epoch_plan(self.info.shard_samples, self.num_slots, self.seed, epoch)
        return batches_per_slot(plan, self.info.shard_samples, self.batch_size) * self.slots_per_rank

    def slot_stream(self, local_slot: int) -> SlotStream:
        return SlotStream(
            self.info,
            self.rank * self.slots_per_rank + local_slot,
            self.num_slots,
            self.batch_size,
            self.seed,
            self.null_label,
            self.shuffle_shards,
            self.strict,
        )

    def __iter__(self) -> Iterator[LatentBatch]:
        # DataLoader takes batches from its workers in turn, starting at worker 0; every slot
        # yields the same number of batches per epoch, so rotating which slot worker 0 serves
        # continues the interleaving exactly where the saved state left it.
        rotation = self.batches_consumed % self.slots_per_rank
        global _exit_handler_registered
        if self.num_workers and not _exit_handler_registered:
            atexit.register(_end_workers_at_exit)
            _exit_handler_registered = True
        loader = DataLoader(
            _RankStream(self, list(self.positions), rotation),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init,
            prefetch_factor=4 if self.num_workers else None,
            persistent_workers=False,
            # Its own generator: drawing the workers' base seed from the global RNG would shift the
            # training's dropout draws when a resumed run starts iterating at another point.
            generator=torch.Generator().manual_seed(self.seed * 65_537 + self.rank),
        )
        for item in loader:
            self.positions[item.local_slot] = item.position
            self.batches_consumed += 1
            self.skipped_shards += len(item.skipped)
            yield item.batch._replace(labels=torch.tensor(item.batch.labels, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: every slot's, and how many batches it has consumed."""
        return {
            "version": 1,
            "batches_consumed": self.batches_consumed,
            "positions": [asdict(p) for p in self.positions],
            "skipped_shards": self.skipped_shards,
            "layout": self._layout(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state` was taken; if the job's layout changed, start the next epoch."""
        positions = [Position(**p) for p in state["positions"]]
        if state["layout"] != self._layout():
            epoch = max(p.epoch for p in positions) + 1
            log.warning(
                "data layout changed since the checkpoint (%s -> %s); exact resume is impossible, starting epoch %d",
                state["layout"],
                self._layout(),
                epoch,
            )
            self.positions = [Position(epoch) for _ in range(self.slots_per_rank)]
            self.batches_consumed = 0
        else:
            self.positions = positions
            self.batches_consumed = int(state["batches_consumed"])
        self.skipped_shards = int(state.get("skipped_shards", 0))

    def _layout(self) -> dict[str, Any]:
        """What the reading order depends on: a state only fits a loader with the same layout."""
        shards = hashlib.sha256(repr((self.info.shard_names, self.info.shard_samples)).encode()).hexdigest()[:16]
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "slots_per_rank": self.slots_per_rank,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_shards": self.shuffle_shards,
            "shards": shards,
        }


_exit_handler_registered = False


def _end_workers_at_exit() -> None:
    """Workers ignore SIGTERM (see _worker_init), and multiprocessing's exit handler terminates
    daemonic children with SIGTERM and then joins them: a worker still alive at exit would make
    its rank wait forever. Registered after multiprocessing's handler, this one runs first and
    ends them for good (without torch's SIGCHLD handler, which would report them as failed)."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()


def _worker_init(worker_id: int) -> None:
    # SLURM signals every process of a job step: a worker must outlive the preemption signals
    # (torch's own SIGTERM handler would end it) so that its rank can still save a checkpoint.
    # The main process ends its workers when it is done; their watchdog ends them if it dies.
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    # The main process owns the cores for training; each worker decodes on one thread.
    torch.set_num_threads(1)
    threading.current_thread().name = f"latent-worker-{worker_id}-{os.getpid()}"
