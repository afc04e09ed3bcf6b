"""The trainer's input: latents streamed from shards in one global order, whatever the number of ranks.

The order of an epoch is defined by L canonical *lanes*, with L fixed for the life of a run
(chosen at its first start as world size × max(1, num_workers), at most the global batch B,
and kept in the loader's state); the world size and the DataLoader workers only decide who
reads what. As in MosaicML streaming: a global sample cursor, a fixed canonical partition
count, a constant global batch.

1. Plan. Per epoch, a permutation of the shard list seeded by (seed, epoch) is dealt shard by
   shard to the lane holding the fewest samples (`epoch_plan`), so lane sizes differ by at
   most one shard.
2. Lanes. A lane reads its shards in groups of `shuffle_shards`, each shard with one GET, the
   next group prefetched in a background thread, and takes the group's samples in a
   permutation seeded by (seed, epoch, lane, pass, group), which mixes several shards.
3. Global batches. Every optimizer step takes the global batch B as chunks of c_l
   consecutive samples of every lane (c_l = B // L, the first B mod L lanes one more),
   concatenated in lane order: position p = 0..B−1 in the step, global index
   step · B + p in the epoch. An epoch has min_l(samples of lane l // c_l) steps (the
   documented remainder: each lane leaves out fewer than largest shard + c_l samples per
   epoch, different ones each epoch; every other sample is taken exactly once per epoch).
   The order is a pure function of (seed, epoch, shard list, L, B, shuffle_shards).
4. Ranks. Rank r of W takes positions [r·B/W, (r+1)·B/W) of every step, cut into micro
   batches of `batch_size`. It reads only the lanes its positions overlap: whole lanes when
   W divides L; otherwise a lane at the edge of two ranks' slices is read (every shard of it
   fetched) by both, each keeping its own part of every chunk. Its DataLoader workers split
   those lanes into consecutive blocks; each worker yields one piece per step (empty when
   it has no lane), so the DataLoader's round robin stays aligned, and the main process cuts
   the micro batches from the pieces in position order (views where a micro batch lies in
   one piece). num_workers=0 reads in-process. Memory: up to 2 × shuffle_shards shards per
   lane a rank reads, so a run resumed on fewer ranks holds more per rank.
5. Draws. Every random choice about a sample is keyed by (seed, epoch, global index):
   whether its flipped latent is used (a bit of a hash, `flip_bits`), the ε of its VAE
   posterior draw z = mean + exp(logvar / 2)·ε and the objective's draws (`draws(generator,
   latent_shape)`, e.g. t, ε, ξ and label dropout) from a `torch.Generator` seeded per sample
   (`sample_seeds`, one stream each). Latents are then scaled with the manifest's
   (z − shift)·scaling. The CPU generator (mt19937) keeps 32 bits of its seed: two samples
   share draws with probability 2⁻³², which biases nothing.
6. Text (`text=True`; the dataset's manifest has a "text" record). Each sample stores K ≥ 1
   captions' encoder outputs, `text.npy` (K, L, D) bfloat16 bits as uint16, `text_mask.npy`
   (K, L), `text_pooled.npy` (K, P) when the encoder pools, and `captions.json`. Per epoch a
   sample takes caption `caption_choices` = its `sample_seeds(seed, epoch, index, 3)` mod K, so
   the choice follows the global index like every other draw (any world size or worker count)
   and changes from epoch to epoch. Where the objective's null-token dropout `draws["drop"]`
   is set, the embedding, mask and pooled vector are the dataset's null text (the encoded empty
   string, `null_text.safetensors`, read once before the workers start) instead: the same draw
   also replaces the class label by ∅ in the loss, so a dropped sample is unconditional in both
   (Ho & Salimans 2022, Algorithm 1); a model of class and text draws `draws["drop_text"]` for
   the text apart (`DiffusionObjective.draw`). `captions` keeps the chosen caption even where
   dropped; the drop draw says which were. Without "drop" (no draw function, the classifier) nothing is
   dropped. The chosen rows are copied once from the shard's bytes into the piece's shared
   buffer and read as bfloat16 by a view; with `text=False` the text members are not decoded.

State. The loader's state is the global cursor (epoch, step in the epoch) with what the order
depends on (L, B, seed, shuffle_shards, a hash of the shard list): the same on every rank, so
a trainer saves it once. `load_state_dict` on any world size and worker count continues at the
cursor's step, reading no consumed shard group again (a lane's start is found from the
manifest's sample counts). A state taken between the micro batches of a step resumes at that
step's first micro batch. A different B, seed, shard list or shuffle_shards is refused with a
DatasetError that says what changed; `allow_batch_change=True` accepts a new B and starts the
next epoch, skipping the rest of the current one.

Failures. A missing or corrupt shard, or one whose latents (with text: text members) differ from
the manifest's shapes or dtypes, is skipped with a warning and counted in `skipped_shards`
(strict: a DatasetError naming it) and not read again in that epoch (`skipped_shards` counts
this process's skips and is not in the state: a rank only sees the shards of its own lanes); a
lane that runs short fills its chunks from a second pass over its own shards, so step counts
stay equal on every rank and nothing hangs. A transient storage error is retried with jittered
exponential backoff for up to `read_timeout` seconds; a shard that still fails is skipped for
that group only. The retries give up at once when the loader's `stop()` turns true (the trainer
passes its preemption flag): the rank then finishes its step with what it has and reaches the
step boundary where it saves (in strict mode the shard given up on is a DatasetError, like any
unreadable one). Known limit: after a shard of an already consumed group of the current epoch
was skipped, a mid-epoch resume places that lane by the manifest's counts, so it may repeat or
leave out up to that shard's samples until the epoch ends.
"""

from __future__ import annotations

import atexit
import hashlib
import heapq
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import DatasetError, load_manifest, load_null_text
from .shards import CorruptShard, NpyReader, decode_npy, encode_npy, shard_problems
from .storage import PERMANENT_ERRORS, TRANSIENT_ERRORS, filesystem, join, redact_text, redact_url

log = logging.getLogger(__name__)

# How long a shard's GET is retried on transient storage errors before the shard is skipped for its group.
READ_TIMEOUT_S = 600.0
RETRY_BASE_S, RETRY_MAX_S = 0.5, 30.0

# The per-sample generator streams (sample_seeds): the VAE posterior's ε, the objective's draws, the flip bit,
# the caption choice.
STREAM_POSTERIOR, STREAM_OBJECTIVE, STREAM_FLIP, STREAM_CAPTION = 0, 1, 2, 3

# (generator, latent shape (C, H, W)) -> one sample's draws for the objective's loss.
DrawFn = Callable[[torch.Generator, tuple[int, ...]], dict[str, torch.Tensor]]


class LatentBatch(NamedTuple):
    latents: torch.Tensor  # (N, C, H, W) float32, scaled for the diffusion model
    labels: torch.Tensor  # (N,) int64; the null label for unlabelled samples
    keys: list[str]  # the samples' __key__, in batch order
    epoch: int
    draws: dict[str, torch.Tensor]  # the objective's draws, each (N, ...); {} without a draw function
    positions: torch.Tensor  # (N,) int64: each sample's global index in the epoch, step · B + position
    # With text: "embedding" (N, L, D) bfloat16, "mask" (N, L) bool, "pooled" (N, P) bfloat16 when the
    # encoder pools; the null text where draws["drop_text"] (else draws["drop"]) is set. {} without text.
    text: dict[str, torch.Tensor]
    captions: list[str]  # the caption each sample took this epoch (also where dropped); [] without text


def epoch_plan(shard_samples: tuple[int, ...], num_lanes: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per lane: a seeded permutation dealt greedily to the lane with the fewest samples."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_samples))
    heap = [(0, lane) for lane in range(num_lanes)]
    plan: list[list[int]] = [[] for _ in range(num_lanes)]
    for shard in order:
        samples, lane = heapq.heappop(heap)
        plan[lane].append(int(shard))
        heapq.heappush(heap, (samples + shard_samples[shard], lane))
    return plan


def chunk_sizes(global_batch: int, num_lanes: int) -> list[int]:
    """Samples each lane gives to every global batch: B // L, the first B mod L lanes one more."""
    return [global_batch // num_lanes + (lane < global_batch % num_lanes) for lane in range(num_lanes)]


def steps_in_epoch(plan: list[list[int]], shard_samples: tuple[int, ...], chunks: list[int]) -> int:
    """Global batches in an epoch: what the lane shortest in chunks can fill."""
    return min(sum(shard_samples[s] for s in shards) // chunk for shards, chunk in zip(plan, chunks, strict=True))


def rank_lanes(chunks: list[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(lane, first, stop) for every lane whose chunk overlaps rank's positions, in lane order:
    the rank keeps samples [first, stop) of that lane's chunk of each step."""
    batch = sum(chunks)
    low, high = rank * batch // world_size, (rank + 1) * batch // world_size
    out, offset = [], 0
    for lane, chunk in enumerate(chunks):
        first, stop = max(low, offset) - offset, min(high, offset + chunk) - offset
        if first < stop:
            out.append((lane, first, stop))
        offset += chunk
    return out


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


@lru_cache(maxsize=64)
def _stream_base(seed: int, epoch: int, stream: int) -> np.uint64:
    return np.uint64(_seed(seed, epoch, stream))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over uint64 arrays (wrapping arithmetic): independent-looking outputs."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: np.ndarray | list[int], stream: int) -> np.ndarray:
    """Generator seeds (uint64 < 2⁶³) for samples at `indices` (global indices in `epoch`), one `stream` of draws.

    A pure function of (seed, epoch, index, stream): the same whichever rank or worker draws it.
    """
    index = np.asarray(indices, dtype=np.uint64)
    mixed = _splitmix64(_stream_base(seed, epoch, stream) + (index + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    return mixed >> np.uint64(1)


def flip_bits(seed: int, epoch: int, indices: np.ndarray | list[int]) -> np.ndarray:
    """Whether each sample at `indices` takes its flipped latent: a fair coin per (seed, epoch, index)."""
    return (sample_seeds(seed, epoch, indices, STREAM_FLIP) >> np.uint64(40)) & np.uint64(1) == 1


def caption_choices(
    seed: int, epoch: int, indices: np.ndarray | list[int], counts: np.ndarray | list[int]
) -> np.ndarray:
    """Which of its counts[i] captions the sample at indices[i] takes: uniform per (seed, epoch, index).

    The modulo's bias is below K / 2⁶³.
    """
    return (sample_seeds(seed, epoch, indices, STREAM_CAPTION) % np.asarray(counts, dtype=np.uint64)).astype(np.int64)


def _arena(fields: dict[str, tuple[tuple[int, ...], torch.dtype]], shared: bool) -> dict[str, torch.Tensor]:
    """Empty tensors of these shapes and dtypes, carved out of one buffer: in a worker one shared-memory
    segment for the whole piece (the DataLoader then passes one handle, not one segment per tensor)."""
    offsets, total = {}, 0
    for name, (shape, dtype) in fields.items():
        total = -(-total // 8) * 8  # aligned for any element size
        offsets[name] = total
        total += math.prod(shape) * dtype.itemsize
    buffer = torch.empty(total, dtype=torch.uint8)
    if shared:
        buffer.share_memory_()
    return {
        name: buffer[offsets[name] : offsets[name] + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (shape, dtype) in fields.items()
    }


class TextInfo(NamedTuple):
    """A dataset's text record as the loader reads it: the manifest's shapes and the null text."""

    max_length: int  # L, tokens per caption
    hidden_size: int  # D
    pooled_size: int | None  # P, or None when the encoder has no pooled vector
    members: tuple[str, ...]  # the .npy members every sample must have
    null_embedding: np.ndarray  # (L, D) uint16: bfloat16 bits of the encoded empty string
    null_mask: np.ndarray  # (L,) bool
    null_pooled: np.ndarray | None  # (P,) uint16 bfloat16 bits, or None


class _TextRecord(NamedTuple):
    """One sample's text members as checked by ShardReader: where the rows start, the member dtypes."""

    count: int  # K captions
    offsets: tuple[int, ...]  # byte offset of row 0 in each of TextInfo.members
    dtypes: tuple[np.dtype, ...]
    captions: list[str]


# The text members a sample holds, in TextInfo.members order, with the row dtypes they may have.
TEXT_MEMBERS = {"text.npy": ("u", 2), "text_mask.npy": ("ub", 1), "text_pooled.npy": ("u", 2)}
CAPTIONS = "captions.json"


def _bf16(bits: np.ndarray) -> torch.Tensor:
    """bfloat16 tensor over uint16 bit patterns, without a copy."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """uint16 bit patterns of a bfloat16 tensor, without a copy."""
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


@lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of a .npy header: parsed once per distinct header."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return dtype, shape, fortran


def _npy_layout(data: memoryview, name: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    """(offset of the data, dtype, shape) of a C-order .npy member, checked against its length."""
    if len(data) < 10 or bytes(data[:6]) != b"\x93NUMPY":
        raise CorruptShard(f"{name} is not a .npy")
    start = 10 if data[6] == 1 else 12
    size = int.from_bytes(bytes(data[8:start]), "little")
    try:
        dtype, shape, fortran = _npy_header(bytes(data[: start + size]))
    except ValueError as e:
        raise CorruptShard(f"{name} is not a readable .npy: {e}") from None
    if fortran and len(shape) > 1:
        raise CorruptShard(f"{name} is in Fortran order")
    if len(data) != start + size + math.prod(shape) * dtype.itemsize:
        raise CorruptShard(f"{name}: {len(data)} bytes do not match its header {dtype} {list(shape)}")
    return start + size, dtype, shape


class DatasetInfo(NamedTuple):
    """What a reader needs from the manifest, small enough to pickle into workers."""

    url: str
    storage_options: Mapping[str, Any]
    shard_names: tuple[str, ...]
    shard_samples: tuple[int, ...]
    shard_bytes: tuple[int, ...]
    stored_shape: tuple[int, ...]  # of each latent .npy member: (2C, H, W) moments or (C, H, W)
    dtype: str  # of each latent .npy member
    moments: bool
    flip: bool
    labelled: bool
    scaling_factor: float
    shift_factor: float
    text: TextInfo | None = None  # None: the loader does not read text (the dataset may hold some)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.stored_shape[0] // 2, *self.stored_shape[1:]) if self.moments else self.stored_shape


class Order(NamedTuple):
    """What the global sample order and the draws depend on, besides the shard list."""

    lanes: int
    global_batch: int
    seed: int
    shuffle_shards: int


class _Piece(NamedTuple):
    """What a worker sends per step: its samples of the rank's slice, positions [start, start + len) of the step."""

    epoch: int
    step: int
    start: int
    latents: torch.Tensor | None  # None when the worker has no lane for this rank
    labels: list[int]  # a list: a tensor would cost a shared-memory segment of its own
    keys: list[str]
    draws: dict[str, torch.Tensor]
    skipped: list[str]  # shards skipped in groups read since the last piece
    text: dict[str, torch.Tensor]  # as LatentBatch.text
    captions: list[str]


class ShardReader:
    """Reads a lane's shards: one GET each, retried on transient errors, checked against the manifest."""

    def __init__(
        self, info: DatasetInfo, strict: bool, read_timeout: float, closing: threading.Event, stopping: Any = None
    ) -> None:
        self.info, self.strict, self.read_timeout, self.closing = info, strict, read_timeout, closing
        self.stopping = stopping  # a multiprocessing.Event the main process sets when stop() turns true
        self.fs, self.root = filesystem(info.url, info.storage_options)  # created in this process
        self.latents = ("latent.npy", "latent_flip.npy") if info.flip else ("latent.npy",)
        self.required = (*self.latents, *info.text.members, CAPTIONS) if info.text is not None else self.latents
        zeros = np.zeros(info.stored_shape, dtype=info.dtype)
        self.member_bytes = len(encode_npy(zeros))  # what every latent member should be: this header, then data
        self.header = encode_npy(zeros)[: self.member_bytes - zeros.nbytes]
        self.jitter = random.Random()  # never the global RNG: timing only, but the trainer owns that one

    def read_group(self, shards: list[int], unreadable: set[int]) -> tuple[list[dict[str, Any]], list[str]]:
        """The samples of a group's readable shards, and the names of those skipped.

        Shards that cannot be read for good (missing, corrupt, wrong latents) join `unreadable`,
        which later passes of the epoch skip; a shard that failed only transiently does not.
        """
        samples, skipped = [], []
        for shard in shards:
            if shard in unreadable:
                continue
            name = self.info.shard_names[shard]
            url = redact_url(join(self.info.url, name))
            try:
                samples.extend(self.read_shard(shard))
                continue
            except (CorruptShard, *PERMANENT_ERRORS) as e:
                unreadable.add(shard)
                reason = redact_text(str(e)) or type(e).__name__
            except _StillFailing as e:
                reason = str(e)
            if self.strict:
                raise DatasetError(f"shard {url} cannot be read: {reason} (strict mode)") from None
            log.warning("skipping shard %s: %s", url, reason)
            skipped.append(name)
        return samples, skipped

    def read_shard(self, shard: int) -> list[dict[str, Any]]:
        """A shard's samples, checked: bytes, sample count, required members, latent shape and dtype."""
        entry = {
            "name": self.info.shard_names[shard],
            "bytes": self.info.shard_bytes[shard],
            "samples": self.info.shard_samples[shard],
        }
        problems, samples = shard_problems(self.fetch(join(self.root, entry["name"])), entry, self.required)
        if problems:
            raise CorruptShard(problems[0])
        for sample in samples:
            for member in self.latents:
                data = sample[member]
                if len(data) != self.member_bytes or data[: len(self.header)] != self.header:
                    self._check_latent(sample["__key__"], member, data)
            if self.info.text is not None:
                sample["__text__"] = self._check_text(sample)
        return samples

    def _check_text(self, sample: dict[str, Any]) -> _TextRecord:
        """Where a sample's caption rows lie, once its text members are checked against the manifest:
        (K, L, D), (K, L) and (K, P) of one K ≥ 1, the row dtypes, and K caption strings."""
        text, key = self.info.text, sample["__key__"]
        rows = {
            "text.npy": (text.max_length, text.hidden_size),
            "text_mask.npy": (text.max_length,),
            "text_pooled.npy": (text.pooled_size,),
        }
        count, offsets, dtypes = None, [], []
        for member in text.members:
            offset, dtype, shape = _npy_layout(sample[member], f"{key}.{member}")
            kinds, itemsize = TEXT_MEMBERS[member]
            if count is None:  # text.npy, the first
                count = shape[0] if shape else 0
            expected = (count, *rows[member])
            if shape != expected or not count or dtype.kind not in kinds or dtype.itemsize != itemsize:
                raise CorruptShard(
                    f"{key}.{member} holds {dtype} {list(shape)}, the manifest's text encoder gives "
                    f"{'uint16' if itemsize == 2 else 'uint8'} [K ≥ 1, {', '.join(map(str, expected[1:]))}]"
                    + (f" with K = {count} (from {key}.text.npy)" if member != "text.npy" else "")
                )
            offsets.append(offset)
            dtypes.append(dtype)
        try:
            captions = json.loads(bytes(sample[CAPTIONS]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptShard(f"{key}.{CAPTIONS} is not valid JSON: {e}") from None
        if not (isinstance(captions, list) and len(captions) == count and all(isinstance(c, str) for c in captions)):
            raise CorruptShard(f"{key}.{CAPTIONS} is not a list of {count} strings (one per row of {key}.text.npy)")
        return _TextRecord(count, tuple(offsets), tuple(dtypes), captions)

    def _check_latent(self, key: str, member: str, data: memoryview) -> None:
        """Headers differ (another writer); fail unless shape and dtype are the manifest's."""
        try:
            array = decode_npy(data)
        except ValueError as e:
            raise CorruptShard(f"{key}.{member} is not a readable .npy: {e}") from None
        if array.shape != tuple(self.info.stored_shape) or array.dtype != np.dtype(self.info.dtype):
            raise CorruptShard(
                f"{key}.{member} holds {array.dtype} {list(array.shape)}, the manifest says "
                f"{self.info.dtype} {list(self.info.stored_shape)}"
            )

    def fetch(self, path: str) -> bytes:
        """The object's bytes in one GET; transient errors retried with jittered backoff up to read_timeout."""
        deadline, attempt = time.monotonic() + self.read_timeout, 0
        while True:
            try:
                return _get_object(self.fs, path)
            except PERMANENT_ERRORS:
                raise
            except TRANSIENT_ERRORS as e:
                attempt += 1
                reason = redact_text(str(e)) or type(e).__name__
                delay = min(RETRY_BASE_S * 2 ** (attempt - 1), RETRY_MAX_S) * self.jitter.uniform(0.5, 1.5)
                if time.monotonic() + delay > deadline:
                    raise _StillFailing(f"{reason} ({attempt} attempts in {self.read_timeout:.0f} s)") from None
                log.warning("reading %s: %s; retry %d in %.1f s", redact_url(path), reason, attempt, delay)
                if self._wait(delay):
                    raise _StillFailing(f"{reason} (gave up: the loader is stopping)") from None

    def _wait(self, seconds: float) -> bool:
        """Sleep; True as soon as the stream is closed or the main process asks readers to give up."""
        end = time.monotonic() + seconds
        while not (self.closing.is_set() or (self.stopping is not None and self.stopping.is_set())):
            if time.monotonic() >= end:
                return False
            self.closing.wait(min(0.1, end - time.monotonic()))
        return True


class _StillFailing(Exception):
    """A shard whose GET still fails with transient errors at the end of read_timeout."""


def _get_object(fs: Any, path: str) -> bytes:
    return fs.cat_file(path)


class LaneStream:
    """Pieces of one rank's slice, step after step, from the lanes given to this worker. Runs inside it."""

    def __init__(
        self,
        info: DatasetInfo,
        order: Order,
        lanes: list[tuple[int, int, int]],
        *,
        rank_start: int,
        null_label: int,
        strict: bool,
        draws: DrawFn | None,
        read_timeout: float,
        stopping: Any = None,
    ) -> None:
        self.info, self.order, self.lanes = info, order, lanes
        self.chunks = chunk_sizes(order.global_batch, order.lanes)
        self.offsets = np.cumsum([0, *self.chunks]).tolist()  # first position of each lane's chunk
        self.null_label, self.strict, self.draws, self.read_timeout = null_label, strict, draws, read_timeout
        self.rank_start = rank_start  # first position of the rank's slice: where an empty piece sits
        self.read_npy = NpyReader()
        self.generator = torch.Generator()
        self.closing = threading.Event()
        self.reader = ShardReader(info, strict, read_timeout, self.closing, stopping)
        self.skipped: list[str] = []  # shards skipped in groups consumed since the last piece

    def plan(self, epoch: int) -> tuple[list[list[int]], int]:
        plan = epoch_plan(self.info.shard_samples, self.order.lanes, self.order.seed, epoch)
        return plan, steps_in_epoch(plan, self.info.shard_samples, self.chunks)

    def pieces(self, epoch: int, step: int) -> Iterator[_Piece]:
        """From (epoch, step) on, endlessly: one piece per step."""
        prefetch = ThreadPoolExecutor(max_workers=max(1, len(self.lanes)), thread_name_prefix="shard-prefetch")
        try:
            while True:
                plan, steps = self.plan(epoch)
                streams = [
                    self._samples(epoch, lane, plan[lane], step * self.chunks[lane], prefetch)
                    for lane, _, _ in self.lanes
                ]
                for s in range(step, steps):
                    samples, positions = [], []
                    for (lane, first, stop), stream in zip(self.lanes, streams, strict=True):
                        chunk = [next(stream) for _ in range(self.chunks[lane])]
                        samples += chunk[first:stop]
                        positions += range(self.offsets[lane] + first, self.offsets[lane] + stop)
                    yield self._piece(epoch, s, samples, positions)
                for stream in streams:
                    stream.close()
                epoch, step = epoch + 1, 0
        finally:
            self.closing.set()  # a retry sleeping in a prefetch thread gives up at once
            prefetch.shutdown(wait=True, cancel_futures=True)

    def _samples(
        self, epoch: int, lane: int, shards: list[int], start: int, prefetch: ThreadPoolExecutor
    ) -> Iterator[dict[str, Any]]:
        """A lane's samples in reading order from its `start`-th, over as many passes as needed.

        The start is found from the manifest's sample counts: groups before it are not read."""
        k = self.order.shuffle_shards
        groups = [shards[i : i + k] for i in range(0, len(shards), k)]
        pass_, group, offset = 0, 0, start
        while group < len(groups) and offset >= sum(self.info.shard_samples[s] for s in groups[group]):
            offset -= sum(self.info.shard_samples[s] for s in groups[group])
            group += 1
        if group == len(groups):  # only when shards were skipped: the run had gone on to a second pass
            pass_, group, offset = 1, 0, 0
        found_any = group != 0  # a pass resumed midway had samples before the resume
        unreadable: set[int] = set()  # this epoch's bad shards: later passes do not read them again
        pending: Future | None = None
        while True:
            # Reads run in the prefetch thread even when not prefetched: the main process (num_workers=0)
            # then only waits on a future, and its signal handlers run while a read is retried.
            pending = pending or prefetch.submit(self.reader.read_group, groups[group], unreadable)
            samples, skipped = pending.result()
            self.skipped += skipped  # counted when consumed, so a discarded prefetch counts nothing
            following = (pass_, group + 1) if group + 1 < len(groups) else (pass_ + 1, 0)
            # Prefetch within this pass only: another pass is needed only when shards were skipped.
            pending = (
                prefetch.submit(self.reader.read_group, groups[group + 1], unreadable)
                if following[0] == pass_
                else None
            )
            found_any = found_any or bool(samples)
            permutation = np.random.default_rng(_seed(self.order.seed, epoch, lane, pass_, group))
            order = permutation.permutation(len(samples))
            for i in range(offset, len(order)):
                yield samples[order[i]]
            if following[0] != pass_:
                if not found_any:
                    raise DatasetError(f"lane {lane}: none of its {len(shards)} shards can be read (see warnings)")
                found_any = False
            (pass_, group), offset = following, 0

    def _piece(self, epoch: int, step: int, samples: list[dict[str, Any]], positions: list[int]) -> _Piece:
        skipped, self.skipped = self.skipped, []
        if not samples:
            return _Piece(epoch, step, self.rank_start, None, [], [], {}, skipped, {}, [])
        indices = np.asarray(positions, dtype=np.int64) + step * self.order.global_batch
        seed, info, n = self.order.seed, self.info, len(samples)
        flips = flip_bits(seed, epoch, indices) if info.flip else np.zeros(n, dtype=bool)
        members = ["latent_flip.npy" if flip else "latent.npy" for flip in flips]
        stored = torch.from_numpy(
            self.read_npy.stack([s[m] for s, m in zip(samples, members, strict=True)])
        ).float()  # (N, 2C, H, W) moments or (N, C, H, W) samples
        drawn = (
            [
                self.draws(self.generator.manual_seed(s), info.latent_shape)
                for s in sample_seeds(seed, epoch, indices, STREAM_OBJECTIVE).tolist()
            ]
            if self.draws is not None
            else []
        )
        shape = (n, *info.latent_shape)
        fields = {name: ((n, *value.shape), value.dtype) for name, value in (drawn[0] if drawn else {}).items()}
        text_fields = _text_fields(info.text, n) if info.text is not None else {}
        arena = _arena({"latents": (shape, torch.float32), **text_fields, **fields}, get_worker_info() is not None)
        latents = arena.pop("latents")
        text = {name: arena.pop(name) for name in text_fields}
        scale, shift = info.scaling_factor, info.shift_factor
        if info.moments:
            # ε of each sample from its own generator, straight into the batch.
            for i, s in enumerate(sample_seeds(seed, epoch, indices, STREAM_POSTERIOR).tolist()):
                torch.randn(shape[1:], generator=self.generator.manual_seed(s), out=latents[i])
            # (mean + std·ε − shift)·scale = ε·(std·scale) + (mean − shift)·scale, std = exp(logvar / 2)
            mean, log_variance = stored.chunk(2, dim=1)
            latents.mul_(torch.exp(0.5 * log_variance + math.log(scale))).add_((mean - shift).mul_(scale))
        else:
            torch.sub(stored, shift, out=latents).mul_(scale)
        draws = {name: torch.stack([d[name] for d in drawn], out=out) for name, out in arena.items()}
        if info.labelled:
            labels = [int(bytes(s["cls"])) if "cls" in s else self.null_label for s in samples]
        else:
            labels = [self.null_label] * n
        keys = [s["__key__"] for s in samples]
        captions = []
        if info.text is not None:
            drop = draws.get("drop_text", draws.get("drop"))  # a class and text model drops them apart
            drop = drop.numpy() if drop is not None else np.zeros(n, dtype=bool)
            captions = _fill_text(
                info.text,
                text,
                samples,
                caption_choices(seed, epoch, indices, [s["__text__"].count for s in samples]),
                drop,
            )
        return _Piece(epoch, step, positions[0], latents, labels, keys, draws, skipped, text, captions)


def _text_fields(text: TextInfo, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The batch's text tensors (names of LatentBatch.text), as _arena fields for n samples."""
    fields = {
        "embedding": ((n, text.max_length, text.hidden_size), torch.bfloat16),
        "mask": ((n, text.max_length), torch.bool),
    }
    if text.pooled_size is not None:
        fields["pooled"] = ((n, text.pooled_size), torch.bfloat16)
    return fields


def _fill_text(
    text: TextInfo, out: dict[str, torch.Tensor], samples: list[dict[str, Any]], choices: np.ndarray, drop: np.ndarray
) -> list[str]:
    """Write each sample's chosen caption rows (the null text where `drop`) into `out`; the chosen captions.

    One copy per row, from the shard's bytes into the batch: the rows are read as uint16 bit patterns
    and `out` holds them as bfloat16 (a view), the mask as bool (nonzero = token)."""
    rows = [_bits(out["embedding"]), out["mask"].numpy()]  # views of `out`, in text.members order
    nulls = [text.null_embedding, text.null_mask]
    if text.pooled_size is not None:
        rows.append(_bits(out["pooled"]))
        nulls.append(text.null_pooled)
    captions = []
    for i, (sample, choice) in enumerate(zip(samples, choices.tolist(), strict=True)):
        record: _TextRecord = sample["__text__"]
        captions.append(record.captions[choice])
        members = zip(text.members, rows, nulls, record.offsets, record.dtypes, strict=True)
        for member, row, null, offset, dtype in members:
            if drop[i]:
                row[i] = null
            else:
                size = null.size  # elements per caption row
                row[i] = np.frombuffer(
                    sample[member], dtype, count=size, offset=offset + choice * size * dtype.itemsize
                ).reshape(null.shape)
    return captions


class _RankDataset(IterableDataset):
    """The DataLoader-facing dataset of one rank: worker w serves the w-th block of the rank's lanes."""

    def __init__(self, loader: LatentLoader, epoch: int, step: int, stopping: Any) -> None:
        self.info, self.order, self.epoch, self.step, self.stopping = loader.info, loader.order, epoch, step, stopping
        self.lanes = rank_lanes(
            chunk_sizes(loader.order.global_batch, loader.order.lanes), loader.rank, loader.world_size
        )
        self.workers = max(1, loader.num_workers)
        self.rank_start = loader.rank * loader.order.global_batch // loader.world_size
        self.null_label, self.strict, self.draws = loader.null_label, loader.strict, loader.draws
        self.read_timeout = loader.read_timeout

    def __iter__(self) -> Iterator[_Piece]:
        worker = get_worker_info()
        w = worker.id if worker else 0
        # Consecutive blocks of lanes, sizes differing by at most one: a worker's piece is contiguous.
        low, high = w * len(self.lanes) // self.workers, (w + 1) * len(self.lanes) // self.workers
        stream = LaneStream(
            self.info,
            self.order,
            self.lanes[low:high],
            rank_start=self.rank_start,
            null_label=self.null_label,
            strict=self.strict,
            draws=self.draws,
            read_timeout=self.read_timeout,
            stopping=self.stopping,
        )
        yield from stream.pieces(self.epoch, self.step)


class LatentLoader:
    """Micro batches of (latents, labels, draws) for one rank, endlessly over epochs, in one global
    order whatever the world size, with exact resume on any number of ranks.

    The manifest is read and checked here, before any worker starts: a missing or invalid
    manifest, an empty dataset, labels beyond the model's classes, or too few samples for
    every lane to fill its chunk of one global batch are errors that say what to do.
    `global_batch` (default batch_size × world_size) must be a multiple of batch_size × world_size;
    `draws(generator, latent_shape)` makes one sample's draws for the objective (picklable).
    `stop()`, polled by a thread of the main process, makes shard reads give up their retries
    (the trainer passes its preemption flag, so that a rank waiting on storage reaches its save).
    `text=True` adds each sample's chosen caption's encoder output and the caption ("Text" above);
    the dataset must then have a text record.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int,
        null_label: int,
        global_batch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_shards: int = 4,
        strict: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
        draws: DrawFn | None = None,
        read_timeout: float = READ_TIMEOUT_S,
        stop: Callable[[], bool] | None = None,
        text: bool = False,
    ) -> None:
        global_batch = global_batch or batch_size * world_size
        if global_batch % (batch_size * world_size):
            raise ValueError(
                f"global batch {global_batch} is not a multiple of batch size {batch_size} × world size {world_size}"
            )
        self.manifest = load_manifest(url, storage_options)
        self.where = where = redact_url(url)
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
            stored_shape=tuple(latent["shape"]),
            dtype=str(latent.get("dtype") or "float16"),
            moments=bool(latent["moments"]),
            flip=bool(latent.get("flip")),
            labelled=labelled,
            scaling_factor=float(codec["scaling_factor"]),
            shift_factor=float(codec.get("shift_factor") or 0.0),
            text=self._text_info(url, storage_options) if text else None,
        )
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.batch_size, self.null_label, self.draws = batch_size, null_label, draws
        self.strict, self.pin_memory, self.read_timeout, self.stop = strict, pin_memory, read_timeout, stop
        self.accumulation = global_batch // (batch_size * world_size)
        # A run's lanes are chosen at its first start; load_state_dict replaces them with the run's own.
        lanes = min(world_size * max(1, num_workers), global_batch)
        self._set_order(Order(lanes, global_batch, seed, shuffle_shards))
        self.cursor = (0, 0)  # (epoch, step in the epoch) of the next global batch to start
        self.micro = 0  # micro batches of the cursor's step already yielded by this object
        self.skipped_shards = 0  # shards this rank's readers skipped, since this object was made

    def _text_info(self, url: str, storage_options: Mapping[str, Any] | None) -> TextInfo:
        """The manifest's text record, checked, with the null text read (one GET, before any worker starts)."""
        where, record = self.where, self.manifest.get("text")
        if not isinstance(record, dict):
            raise DatasetError(
                f'data.url={where} has no text embeddings (its manifest.json has no "text" record) but the '
                "loader was asked for text (a text-conditioned model): point data.url at a dataset encoded with "
                "its captions, re-encode this one with a text encoder (data_tools.encode_latents), or train a "
                "model without text conditioning"
            )
        encoder = record["encoder"]  # validated with the manifest
        length, hidden, pooled = encoder["max_length"], encoder["hidden_size"], encoder["pooled_size"]
        null = load_null_text(url, storage_options, self.manifest)  # checked against the encoder's sizes
        members = tuple(m for m in TEXT_MEMBERS if m != "text_pooled.npy" or pooled is not None)
        return TextInfo(
            max_length=length,
            hidden_size=hidden,
            pooled_size=pooled,
            members=members,
            # Stored as bfloat16: the float32 copies convert back exactly.
            null_embedding=_bits(null["embedding"].to(torch.bfloat16)),
            null_mask=null["mask"].numpy(),
            null_pooled=_bits(null["pooled"].to(torch.bfloat16)) if pooled is not None else None,
        )

    @property
    def null_text(self) -> dict[str, torch.Tensor] | None:
        """The null text dropped samples get, as LatentBatch.text without the batch axis; None without text."""
        text = self.info.text
        if text is None:
            return None
        null = {"embedding": _bf16(text.null_embedding), "mask": torch.from_numpy(text.null_mask)}
        if text.null_pooled is not None:
            null["pooled"] = _bf16(text.null_pooled)
        return null

    def _set_order(self, order: Order) -> None:
        self.order = order
        self.steps_per_epoch.cache_clear()
        if self.steps_per_epoch(0) == 0:
            raise DatasetError(
                f"{self.where}: {self.manifest['num_samples']} samples in {len(self.info.shard_names)} shards "
                f"cannot give each of {order.lanes} lanes (world size × data workers at the run's first start) "
                f"its chunk of a global batch of {order.global_batch}; use fewer data workers, a smaller batch, "
                "or re-encode with smaller shards"
            )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the latents this loader yields."""
        return self.info.latent_shape

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._normalized(self.cursor)[0]

    @lru_cache(maxsize=4)  # noqa: B019 - a few loaders per process, a few epochs each
    def steps_per_epoch(self, epoch: int) -> int:
        """Global batches (optimizer steps) in `epoch`, the same on every rank."""
        plan = epoch_plan(self.info.shard_samples, self.order.lanes, self.order.seed, epoch)
        return steps_in_epoch(plan, self.info.shard_samples, chunk_sizes(self.order.global_batch, self.order.lanes))

    def batches_per_epoch(self, epoch: int) -> int:
        """Micro batches this rank yields in `epoch` (the same on every rank)."""
        return self.steps_per_epoch(epoch) * self.accumulation

    def _normalized(self, cursor: tuple[int, int]) -> tuple[int, int]:
        epoch, step = cursor
        while step >= self.steps_per_epoch(epoch):
            epoch, step = epoch + 1, step - self.steps_per_epoch(epoch)
        return epoch, step

    def __iter__(self) -> Iterator[LatentBatch]:
        global _exit_handler_registered
        if self.num_workers and not _exit_handler_registered:
            atexit.register(_end_workers_at_exit)
            _exit_handler_registered = True
        self.cursor = self._normalized(self.cursor)
        self._pin_joined = self.pin_memory and self._pieces_joined()
        stopping = multiprocessing.get_context().Event()  # reaches the workers: they ignore the signals
        loader = DataLoader(
            _RankDataset(self, *self.cursor, stopping),
            batch_size=None,
            num_workers=self.num_workers,
            # Pinned by the DataLoader's thread where each micro batch is a view of one piece; else pinned
            # by the copy that joins the pieces (one copy, not two).
            pin_memory=self.pin_memory and not self._pin_joined,
            worker_init_fn=_worker_init,
            prefetch_factor=4 if self.num_workers else None,
            persistent_workers=False,
            # Its own generator: drawing the workers' base seed from the global RNG would shift the
            # training's dropout draws when a resumed run starts iterating at another point.
            generator=torch.Generator().manual_seed(self.order.seed * 65_537 + self.rank),
        )
        pieces = iter(loader)  # starts the workers
        if self.stop is not None:
            threading.Thread(target=_watch, args=(self.stop, stopping), name="loader-stop", daemon=True).start()
        workers = max(1, self.num_workers)
        try:
            yield from self._micro_batches(pieces, workers)
        finally:
            stopping.set()  # also ends the watcher

    def _micro_batches(self, pieces: Iterator[_Piece], workers: int) -> Iterator[LatentBatch]:
        while True:
            # DataLoader takes one piece from each worker in turn: every worker yields one per step.
            step = [next(pieces) for _ in range(workers)]
            if {(p.epoch, p.step) for p in step} != {self.cursor}:
                raise RuntimeError(f"data workers out of step: {[(p.epoch, p.step) for p in step]} at {self.cursor}")
            self.skipped_shards += sum(len(p.skipped) for p in step)
            for micro in range(self.micro, self.accumulation):
                batch = self._micro_batch(step, micro)
                if micro + 1 == self.accumulation:
                    epoch, number = self.cursor
                    self.cursor, self.micro = self._normalized((epoch, number + 1)), 0
                else:
                    self.micro = micro + 1
                yield batch

    def _micro_batch(self, pieces: list[_Piece], micro: int) -> LatentBatch:
        """Positions [low, low + batch_size) of the step, from the pieces that hold them (views when one does)."""
        epoch, step = pieces[0].epoch, pieces[0].step
        low = self.rank * self.order.global_batch // self.world_size + micro * self.batch_size
        high = low + self.batch_size
        parts = [
            (p, max(low, p.start) - p.start, min(high, p.start + len(p.keys)) - p.start)
            for p in pieces
            if p.start < high and low < p.start + len(p.keys)
        ]

        pin = self._pin_joined  # else the DataLoader pinned the pieces

        def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
            if len(tensors) == 1:
                return tensors[0].pin_memory() if pin else tensors[0]  # a view of the piece
            shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
            return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin))

        latents = joined([p.latents[a:b] for p, a, b in parts])
        draws = {name: joined([p.draws[name][a:b] for p, a, b in parts]) for name in parts[0][0].draws}
        labels = torch.tensor([label for p, a, b in parts for label in p.labels[a:b]], dtype=torch.long)
        keys = [key for p, a, b in parts for key in p.keys[a:b]]
        positions = torch.arange(low, high, dtype=torch.long) + step * self.order.global_batch
        text = {name: joined([p.text[name][a:b] for p, a, b in parts]) for name in parts[0][0].text}
        captions = [caption for p, a, b in parts for caption in p.captions[a:b]]
        return LatentBatch(latents, labels, keys, epoch, draws, positions, text, captions)

    def _pieces_joined(self) -> bool:
        """Whether some micro batch of this rank spans the pieces of two workers (and is joined by a copy)."""
        lanes = rank_lanes(chunk_sizes(self.order.global_batch, self.order.lanes), self.rank, self.world_size)
        workers, low = max(1, self.num_workers), self.rank * self.order.global_batch // self.world_size
        sizes = [
            sum(stop - first for _, first, stop in lanes[w * len(lanes) // workers : (w + 1) * len(lanes) // workers])
            for w in range(workers)
        ]
        ends = {low + end for end in itertools.accumulate(sizes)}  # where one worker's piece ends
        micro_ends = {low + (j + 1) * self.batch_size for j in range(self.accumulation)}
        return not ends - {low} <= micro_ends

    def state_dict(self) -> dict[str, Any]:
        """The global cursor and what the order depends on: the same on every rank."""
        epoch, step = self.cursor
        return {
            "version": 2,
            "epoch": epoch,
            "step": step,
            "lanes": self.order.lanes,
            "global_batch": self.order.global_batch,
            "seed": self.order.seed,
            "shuffle_shards": self.order.shuffle_shards,
            "shards": self._shards_hash(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, allow_batch_change: bool = False) -> None:
        """Continue at the state's cursor, on this loader's ranks and workers, in the run's lanes.

        A different seed, shard list or shuffle_shards is refused (DatasetError); so is a different
        global batch unless `allow_batch_change`, which starts the next epoch instead.
        """
        if state.get("version", 1) < 2:  # a per-rank state from before the global cursor
            epoch = max(p["epoch"] for p in state["positions"]) + 1
            log.warning("a data position from an older version of the loader: starting epoch %d", epoch)
            self.cursor, self.micro = (epoch, 0), 0
            return
        ours = self.order
        changed = [
            (name, state[key], now)
            for name, key, now in (
                ("run.seed", "seed", ours.seed),
                ("data.shuffle_shards", "shuffle_shards", ours.shuffle_shards),
            )
            if state[key] != now
        ]
        if changed:
            name, before, now = changed[0]
            raise DatasetError(
                f"{name} was {before} when the checkpoint was saved and is {now} now; the sample order "
                f"depends on it: set {name}={before} to resume, or start a new run (a new run.dir or --no-resume)"
            )
        if state["shards"] != self._shards_hash():
            raise DatasetError(
                f"{self.where}: the dataset's shard list differs from the one the checkpoint was reading; "
                "resume with the dataset the run started with, or start a new run (a new run.dir or --no-resume)"
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if state["global_batch"] != ours.global_batch:
            rest = f"the rest of epoch {epoch} ({step} of its global batches were taken) is skipped" if step else ""
            if not allow_batch_change:
                raise DatasetError(
                    f"the global batch (train.global_batch_size) was {state['global_batch']} when the checkpoint "
                    f"was saved and is {ours.global_batch} now: the epoch's sample order and each sample's draws "
                    f"depend on it, so the epoch cannot be continued exactly. Keep train.global_batch_size="
                    f"{state['global_batch']} (any number of ranks dividing it works), or allow the change "
                    f"(allow_batch_change), which starts at the next epoch boundary{': ' + rest if rest else ''}"
                )
            log.warning(
                "global batch changed from %d to %d: starting epoch %d%s",
                state["global_batch"],
                ours.global_batch,
                epoch + bool(step),
                f"; {rest}" if rest else "",
            )
            self._set_order(ours._replace(lanes=min(int(state["lanes"]), ours.global_batch)))
            self.cursor, self.micro = (epoch + bool(step), 0), 0
            return
        self._set_order(ours._replace(lanes=int(state["lanes"])))
        self.cursor, self.micro = (epoch, step), 0

    def _shards_hash(self) -> str:
        return hashlib.sha256(repr((self.info.shard_names, self.info.shard_samples)).encode()).hexdigest()[:16]


def _watch(stop: Callable[[], bool], stopping: Any) -> None:
    """Set `stopping` once stop() is true (or once the iteration that made it ends)."""
    while not stopping.wait(0.2):
        if stop():
            log.warning("the loader is stopping: shard reads give up their retries")
            stopping.set()


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
