"""Encode images into VAE-latent WebDataset shards plus a manifest, on any fsspec URL.

python -m data_tools.encode_latents --input SRC --output DST --vae (pixel | HUB_ID | PATH) [options]

The input is split into units (a folder's sorted files in chunks of --shard-size, or one
input tar each); unit u writes shards `{u:06d}-{c:03d}.tar` and then a record
`_parts/unit-{u:06d}.json` (its shards' counts, sizes and sha256, and skipped inputs).
Part r of a --world-size W run does the units u ≡ r (mod W). A unit with a record whose
shards are all present is done, so a rerun after a kill skips it; the manifest is written
from the records once every unit has one. Output bytes depend only on the input and the
encoding arguments: not on worker count, timing, or how the work was split.

With --text-encoder, each sample's captions are encoded too (text.npy, text_mask.npy,
text_pooled.npy, captions.json; docs/contracts.md), in one forward per image batch, and the
encoded empty caption is written once as null_text.safetensors before the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from diffusion_dist import __version__
from diffusion_dist.codecs import PRECISIONS, Codec, load_codec
from diffusion_dist.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, manifest_bytes
from diffusion_dist.data.shards import encode_npy, tar_bytes
from diffusion_dist.data.storage import (
    filesystem,
    is_local,
    join,
    read_bytes,
    redact_text,
    redact_url,
    write_atomic,
)
from diffusion_dist.text import TextEncoder, bf16_bits

from . import progress_interval
from .images import (
    BadImage,
    FolderSource,
    InputError,
    TarSource,
    center_crop_resize,
    decode_image,
    names_tar_shards,
    open_source,
)

log = logging.getLogger("encode_latents")
PARTS = "_parts"
NULL_TEXT = "null_text.safetensors"
EXAMPLES = 8  # captions the manifest keeps as text.examples
MISSING_CAPTIONS = ("skip", "empty")


@dataclass
class ImageBatch:
    """Decoded images of one unit, in source order, with the inputs skipped since the previous batch."""

    unit: int
    images: torch.Tensor  # (B, 3, R, R) uint8
    keys: list[str]
    labels: list[int | None]
    metadata: list[dict[str, Any]]
    captions: list[list[str]] = field(default_factory=list)  # per image, when captions are encoded
    missing: int = 0  # images given the empty caption (--missing-captions empty)
    skipped: list[dict[str, str]] = field(default_factory=list)
    last: bool = False  # the unit's final batch

    def pin_memory(self) -> ImageBatch:
        self.images = self.images.pin_memory()
        return self


class UnitImages(IterableDataset):
    """Reads and decodes the units of this part; DataLoader worker w takes every num_workers-th unit.

    Batches never span units, so their composition (and so the VAE's output bytes) does not
    depend on how many workers there are or which part encodes the unit.
    """

    def __init__(
        self,
        source: FolderSource | TarSource,
        units: list[int],
        resolution: int,
        batch_size: int,
        missing_captions: str | None = None,  # None: captions are not encoded; else skip | empty
    ):
        self.source, self.units, self.resolution, self.batch_size = source, units, resolution, batch_size
        self.missing_captions = missing_captions

    def __iter__(self) -> Iterator[ImageBatch]:
        worker = get_worker_info()
        units = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        for unit in units:
            yield from self._unit_batches(unit)

    def _unit_batches(self, unit: int) -> Iterator[ImageBatch]:
        images, keys, labels, metadata, captions, skipped = [], [], [], [], [], []
        missing = 0

        def batch(last: bool) -> ImageBatch:
            nonlocal missing
            stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) if images else torch.empty(0, 3, 1, 1)
            out = ImageBatch(
                unit, stacked.contiguous(), list(keys), list(labels), list(metadata), list(captions), missing
            )
            out.skipped, out.last = list(skipped), last
            missing = 0
            for buffer in (images, keys, labels, metadata, captions, skipped):
                buffer.clear()
            return out

        for item in self.source.iter_unit(unit):
            try:
                if item.reason:
                    raise BadImage(item.reason)
                if self.missing_captions == "skip" and not item.captions:
                    raise BadImage("no caption")
                image = decode_image(item.data)
                array = center_crop_resize(image, self.resolution)
            except BadImage as e:
                skipped.append({"source": item.source, "reason": str(e)})
                continue
            meta = {"source": item.source, "width": image.width, "height": image.height}
            if item.captions:
                meta["caption"] = item.captions[0]
            images.append(array)
            keys.append(item.key)
            labels.append(item.label)
            metadata.append(meta)
            if self.missing_captions is not None:
                captions.append(item.captions or [""])
                missing += not item.captions
            if len(images) == self.batch_size:
                yield batch(last=False)
        yield batch(last=True)


@dataclass
class UnitResult:
    """What one unit produced, accumulated batch by batch."""

    latents: list[np.ndarray] = field(default_factory=list)  # float16, one per sample
    flipped: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    text: list[dict[str, bytes]] = field(default_factory=list)  # per sample: the text members, encoded
    skipped: list[dict[str, str]] = field(default_factory=list)
    captions: dict[str, int] | None = None  # caption counts (text_counts), when captions are encoded
    examples: list[str] = field(default_factory=list)  # the first EXAMPLES distinct first captions of images


def text_counts() -> dict[str, int]:
    """Caption statistics of a unit (its record) or a run: captions encoded, the most for one image,
    those cut to max_length, and images without a caption (skipped or given the empty one)."""
    return {"total": 0, "max_per_image": 0, "truncated": 0, "missing": 0}


def text_members(encoder: TextEncoder, captions: list[list[str]]) -> tuple[list[dict[str, bytes]], int]:
    """Each image's text members (text.npy (K, L, D), text_mask.npy (K, L), text_pooled.npy (K, P),
    captions.json) from one forward over all the batch's captions; and how many were truncated."""
    encoded = encoder.encode([c for image in captions for c in image])
    embedding = bf16_bits(encoded.embedding)  # (ΣK, L, D) uint16 bfloat16 bits
    mask = encoded.mask.cpu().numpy().astype(np.uint8)  # (ΣK, L)
    pooled = None if encoded.pooled is None else bf16_bits(encoded.pooled)  # (ΣK, P)
    members, start = [], 0
    for image in captions:
        end = start + len(image)
        sample = {
            "text.npy": encode_npy(embedding[start:end]),
            "text_mask.npy": encode_npy(mask[start:end]),
            "captions.json": json.dumps(image, ensure_ascii=False).encode(),
        }
        if pooled is not None:
            sample["text_pooled.npy"] = encode_npy(pooled[start:end])
        members.append(sample)
        start = end
    return members, encoded.truncated


def null_text_bytes(encoder: TextEncoder) -> bytes:
    """null_text.safetensors: the encoded empty caption, the unconditional input of classifier-free guidance."""
    from safetensors.torch import save

    encoded = encoder.encode([""])
    tensors = {
        "embedding": encoded.embedding[0].to(torch.bfloat16).cpu().contiguous(),  # (L, D)
        "mask": encoded.mask[0].to(torch.uint8).cpu().contiguous(),  # (L,)
    }
    if encoded.pooled is not None:
        tensors["pooled"] = encoded.pooled[0].to(torch.bfloat16).cpu().contiguous()  # (P,)
    return save(tensors)


def shard_name(unit: int, chunk: int) -> str:
    return f"{unit:06d}-{chunk:03d}.tar"


def record_path(root: str, unit: int) -> str:
    return join(root, PARTS, f"unit-{unit:06d}.json")


def write_unit(fs, root: str, unit: int, result: UnitResult, encoding: dict[str, Any], shard_size: int) -> dict:
    """Write a unit's shards (each complete or absent under its final name), then its record."""
    shards = []
    for chunk, start in enumerate(range(0, len(result.keys), shard_size)):
        samples = []
        for i in range(start, min(start + shard_size, len(result.keys))):
            sample = {"__key__": result.keys[i], "latent.npy": encode_npy(result.latents[i])}
            if result.flipped:
                sample["latent_flip.npy"] = encode_npy(result.flipped[i])
            if result.labels[i] is not None:
                sample["cls"] = str(result.labels[i]).encode()
            sample["json"] = json.dumps(result.metadata[i], sort_keys=True).encode()
            if result.text:
                sample.update(result.text[i])
            samples.append(sample)
        data = tar_bytes(samples)
        name = shard_name(unit, chunk)
        write_atomic(fs, join(root, name), data)
        shards.append(
            {"name": name, "samples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    labels = [label for label in result.labels if label is not None]
    record = {
        "unit": unit,
        "encoding": encoding,
        "shards": shards,
        "skipped": result.skipped,
        "labelled": bool(labels),
        "max_label": max(labels) if labels else None,
    }
    if result.captions is not None:
        record["captions"] = result.captions
        # A few captions for in-training sample grids when tracking.prompts sets none: each image's first.
        record["examples"] = result.examples
    write_atomic(fs, record_path(root, unit), manifest_bytes(record))
    return record


def read_record(fs, root: str, unit: int) -> dict[str, Any] | None:
    try:
        return json.loads(read_bytes(fs, record_path(root, unit)))
    except FileNotFoundError:
        return None


def shard_sizes(fs, root: str) -> dict[str, int]:
    """Sizes of the files directly under the output prefix, from one listing."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    return {path.rsplit("/", 1)[-1]: info["size"] for path, info in fs.find(root, maxdepth=1, detail=True).items()}


def unit_is_done(record: dict[str, Any] | None, encoding: dict[str, Any], sizes: dict[str, int]) -> bool:
    """A unit is done when its record matches these settings and every shard it lists has its size."""
    return (
        record is not None
        and record["encoding"] == encoding
        and all(sizes.get(s["name"]) == s["bytes"] for s in record["shards"])
    )


def finalize(
    fs, root: str, encoding: dict[str, Any], class_names: list[str] | None, null_text: bytes | None = None
) -> tuple[dict[str, Any] | None, list[int]]:
    """Write manifest.json from all unit records: (the manifest, []), or (None, units without a record yet).

    With captions (`null_text`: null_text_bytes), null_text.safetensors is written first. Shards and
    records left by an earlier run with other settings (--overwrite with another --shard-size, say)
    are deleted here, when every unit is done and nothing else writes."""
    fs.invalidate_cache()
    records, missing = [], []
    for unit in range(encoding["num_units"]):
        record = read_record(fs, root, unit)
        if record is None or record["encoding"] != encoding:
            missing.append(unit)
        else:
            records.append(record)
    if missing:
        return None, missing
    shards = [s for r in records for s in r["shards"]]
    labelled = any(r["labelled"] for r in records)
    max_label = max((r["max_label"] for r in records if r["max_label"] is not None), default=-1)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "codec": encoding["codec"],
        "latent": encoding["latent"],
        "resolution": encoding["resolution"],
        "labels": {
            "labelled": labelled,
            "num_classes": len(class_names) if class_names else (max_label + 1 if labelled else 0),
            "class_names": class_names,
        },
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "skipped": [s for r in records for s in r["skipped"]],
        "tool": {"name": "data_tools.encode_latents", "version": __version__, "args": encoding["args"]},
    }
    if "text" in encoding:
        counts = [r["captions"] for r in records]
        manifest["text"] = {
            "encoder": encoding["text"]["encoder"],
            "null": NULL_TEXT,
            "captions": {
                "max_per_image": max((c["max_per_image"] for c in counts), default=0),
                "total": sum(c["total"] for c in counts),
                "truncated": sum(c["truncated"] for c in counts),
                "missing": {"policy": encoding["args"]["missing_captions"], "count": sum(c["missing"] for c in counts)},
            },
            "examples": list(dict.fromkeys(c for r in records for c in r["examples"]))[:EXAMPLES],
        }
        write_atomic(fs, join(root, NULL_TEXT), null_text)  # readers may rely on it once the manifest exists
    write_atomic(fs, join(root, MANIFEST), manifest_bytes(manifest))
    remove_stale_files(fs, root, {s["name"] for s in shards}, encoding["num_units"], text="text" in encoding)
    return manifest, []


def remove_stale_files(fs, root: str, shards: set[str], num_units: int, text: bool = False) -> None:
    """Delete shards the manifest does not list, records of units beyond num_units, and a null text
    embedding in a dataset that no longer has text."""
    current_records = {record_path(root, u).rsplit("/", 1)[-1] for u in range(num_units)}
    stale = [
        p
        for p in fs.find(root, maxdepth=1)
        if (p.endswith(".tar") and p.rsplit("/", 1)[-1] not in shards) or (not text and p.endswith("/" + NULL_TEXT))
    ]
    if fs.exists(join(root, PARTS)):
        stale += [p for p in fs.find(join(root, PARTS)) if p.rsplit("/", 1)[-1] not in current_records]
    for path in stale:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass  # another part finalizing at the same time removed it


def json_options(text: str) -> dict[str, Any]:
    """--storage-options value; the error names the problem but never echoes the text (it may hold secrets)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.encode_latents",
        description="Encode images into VAE-latent WebDataset shards plus manifest.json on any fsspec URL.",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="image folder (class subfolders = labels) or tar shards, e.g. s3://bucket/images/{00000..00099}.tar",
    )
    parser.add_argument("--output", required=True, help="dataset prefix: path, file://..., s3://bucket/prefix")
    parser.add_argument("--vae", required=True, help="'pixel' (lossless, no weights) or an AutoencoderKL hub id/path")
    parser.add_argument("--vae-subfolder", default=None, help="subfolder of a full pipeline holding the VAE, e.g. vae")
    parser.add_argument("--resolution", type=int, default=256, help="center crop, then resize to this (pixels)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="image decoding processes (default: cores, at most 8)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    parser.add_argument(
        "--captions",
        default=None,
        help='image folder input: captions as JSON lines {"file": "<path in the folder>", "caption": "..."} '
        'or {"file": ..., "captions": [...]} (tar inputs carry <key>.txt or <key>.json)',
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        help="encode the captions with this CLIP text / T5 encoder (hub id or folder holding its tokenizer)",
    )
    parser.add_argument(
        "--text-max-length",
        type=int,
        default=None,
        help="tokens per caption, padded or truncated (default: the tokenizer's maximum, at most 77)",
    )
    parser.add_argument(
        "--missing-captions",
        choices=MISSING_CAPTIONS,
        default=None,
        help="images without a caption: skip (listed in the manifest) or empty (the empty caption); default skip",
    )
    parser.add_argument("--flip", action="store_true", help="also encode the mirrored image (latent_flip.npy)")
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default=None,
        help="VAE precision (default: bf16 on GPU, fp32 on CPU)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--rank", type=int, default=None, help="this part (default: SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument(
        "--world-size", type=int, default=None, help="number of parts (default: SLURM_ARRAY_TASK_COUNT, else 1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace output encoded with other settings")
    parser.add_argument("--finalize", action="store_true", help="only write the manifest from finished parts")
    parser.add_argument(
        "--storage-options",
        type=json_options,
        default={},
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'',
    )
    parser.add_argument(
        "--input-storage-options",
        type=json_options,
        default=None,
        help="fsspec options for --input when they differ from --storage-options",
    )
    return parser.parse_args(argv)


def part_from_env(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size) from the flags, else from a SLURM array (IDs may start above 0), else (0, 1)."""
    env = os.environ
    rank, world = args.rank, args.world_size
    if rank is None and "SLURM_ARRAY_TASK_ID" in env:
        rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if world is None and "SLURM_ARRAY_TASK_COUNT" in env:
        world = int(env["SLURM_ARRAY_TASK_COUNT"])
    rank, world = (0 if rank is None else rank), (1 if world is None else world)
    if world < 1:
        raise InputError(f"--world-size {world} must be >= 1")
    if not 0 <= rank < world:
        raise InputError(f"--rank {rank} must lie in [0, --world-size {world})")
    return rank, world


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("resolution", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise InputError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.text_encoder is None:
        given = [f for f in ("captions", "text_max_length", "missing_captions") if getattr(args, f) is not None]
        if given:
            raise InputError(
                f"--{given[0].replace('_', '-')} needs --text-encoder: captions are encoded with a text encoder "
                "(a hub id or a folder holding a CLIP text model or a T5 encoder and its tokenizer)"
            )
    elif args.captions is None and not names_tar_shards(args.input):
        raise InputError(
            f"--text-encoder on the image folder {redact_url(args.input)} needs --captions FILE: one JSON line per "
            'image, {"file": "<path in the folder>", "captions": ["...", ...]} (tar inputs carry their captions)'
        )


def encoding_settings(
    args, source, codec: Codec, precision: str, text_encoder: TextEncoder | None = None
) -> dict[str, Any]:
    """Everything that determines the output bytes; parts and reruns must agree on all of it.

    The input is recorded as an absolute URL, so `data/x`, `data/x/` and `/abs/data/x` agree.
    Without captions the settings are exactly those of a dataset without text."""
    side = args.resolution // codec.downsample
    channels = codec.latent_channels * (2 if codec.moments else 1)
    settings = {
        "codec": codec.info(),
        "latent": {
            "shape": [channels, side, side],
            "dtype": "float16",
            "layout": "moments" if codec.moments else "sample",
            "moments": codec.moments,
            "flip": args.flip,
        },
        "resolution": args.resolution,
        "num_units": source.num_units,
        # Recorded in the manifest: never credentials, never options that do not change the bytes.
        "args": {
            "input": redact_url(source.canonical_url()),
            "vae": args.vae,
            "vae_subfolder": args.vae_subfolder,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "flip": args.flip,
            "precision": precision,
        },
    }
    if text_encoder is not None:
        settings["text"] = {"encoder": text_encoder.record()}
        settings["args"].update(
            text_encoder=text_encoder.name,  # a local folder as an absolute path: parts may spell it otherwise
            text_max_length=text_encoder.max_length,
            captions=redact_url(source.captions_url) if getattr(source, "captions_url", None) else None,
            captions_sha256=getattr(source, "captions_sha256", None),  # edited captions are other settings
            missing_captions=args.missing_captions or "skip",
        )
    return settings


def previous_settings(fs, root: str) -> dict[str, Any] | None:
    """The encoding settings of a finished dataset already at the output, if any."""
    if not fs.exists(join(root, MANIFEST)):
        return None
    manifest = json.loads(read_bytes(fs, join(root, MANIFEST)))
    return {
        "codec": manifest.get("codec"),
        "latent": manifest.get("latent"),
        "resolution": manifest.get("resolution"),
        "args": manifest.get("tool", {}).get("args"),
        "text": {"encoder": manifest["text"]["encoder"]} if "text" in manifest else None,
    }


def refuse_other_settings(previous: dict[str, Any], encoding: dict[str, Any], output: str) -> None:
    """Stop before writing if the output holds data encoded with other settings."""
    differences = _differences(previous, {k: encoding.get(k) for k in previous})
    if differences:
        raise InputError(
            f"--output {redact_url(output)} already holds latents encoded with other settings "
            f"({'; '.join(differences[:6])}). Choose another --output, or pass --overwrite to replace them"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d for k in sorted(old.keys() | new.keys()) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]


def encode_part(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_arguments(args)
    rank, world = part_from_env(args)
    input_options = args.storage_options if args.input_storage_options is None else args.input_storage_options
    source = open_source(args.input, input_options, args.shard_size, args.captions)
    fs, root = filesystem(args.output, args.storage_options)
    if not is_local(fs) and not fs.exists(root.split("/", 1)[0]):
        raise InputError(
            f"--output {redact_url(args.output)}: bucket {root.split('/', 1)[0]!r} does not exist or is not "
            "reachable; create it, or check the endpoint and credentials"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    # The text encoder runs in fp32 whatever --precision says (T5 overflows in fp16).
    text_encoder = None
    if args.text_encoder is not None:
        text_encoder = TextEncoder.load(args.text_encoder, args.text_max_length, device)
    codec = load_codec(args.vae, args.vae_subfolder, device, precision)
    if args.resolution % codec.downsample:
        raise InputError(
            f"--resolution {args.resolution} must be a multiple of the VAE's downsampling factor {codec.downsample}"
        )
    encoding = encoding_settings(args, source, codec, precision, text_encoder)
    null_text = None if text_encoder is None else null_text_bytes(text_encoder)

    if args.finalize:
        _, missing = finalize(fs, root, encoding, source.class_names, null_text)
        if missing:
            raise InputError(
                f"--finalize: {len(missing)} of {encoding['num_units']} units are not encoded yet "
                f"(first: {missing[:5]}); run the missing parts first"
            )
        log.info("wrote %s", redact_url(join(args.output, MANIFEST)))
        return 0

    my_units = list(range(rank, source.num_units, world))
    if args.overwrite:
        if fs.exists(join(root, MANIFEST)):
            fs.rm_file(join(root, MANIFEST))
    elif (previous := previous_settings(fs, root)) is not None:
        refuse_other_settings(previous, encoding, args.output)

    sizes = shard_sizes(fs, root)
    todo = []
    for unit in my_units:
        record = read_record(fs, root, unit)
        if record is not None and record["encoding"] != encoding and not args.overwrite:
            refuse_other_settings(record["encoding"], encoding, args.output)
        if args.overwrite or not unit_is_done(record, encoding, sizes):
            todo.append(unit)
    log.info(
        "part %d/%d: %d units, %d already done, %d to encode",
        rank,
        world,
        len(my_units),
        len(my_units) - len(todo),
        len(todo),
    )

    stats = encode_units(args, source, codec, todo, fs, root, encoding, text_encoder)

    manifest, missing = finalize(fs, root, encoding, source.class_names, null_text)
    elapsed = time.perf_counter() - start
    reasons = Counter(s["reason"].split(":")[0] for s in stats["skipped"])
    captions = ""
    if text_encoder is not None:
        counts, policy = stats["captions"], encoding["args"]["missing_captions"]
        captions = (
            f"; captions: {counts['total']} encoded (at most {counts['max_per_image']} per image), "
            f"{counts['truncated']} truncated to {text_encoder.max_length} tokens, {counts['missing']} images "
            f"without one ({'skipped' if policy == 'skip' else 'given the empty caption'})"
        )
    print(
        f"encoded {stats['images']} images{' (+ flips)' if args.flip else ''} in {elapsed:.1f} s "
        f"({stats['images'] / max(elapsed, 1e-9):.1f} images/s); skipped {len(stats['skipped'])}"
        + (f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if reasons else "")
        + captions
        + f"; wrote {stats['shards']} shards ({stats['bytes'] / 2**20:.1f} MiB); "
        f"{len(my_units) - len(todo)} units were already done",
        file=sys.stderr,
    )
    if missing:
        print(
            f"manifest not written yet: {len(missing)} of {encoding['num_units']} units belong to parts still "
            "running; the last part to finish writes it (or run with --finalize)",
            file=sys.stderr,
        )
    elif manifest["num_samples"] == 0:
        print(
            "error: no input image could be encoded; the manifest lists every skipped input with its reason",
            file=sys.stderr,
        )
        return 1
    else:
        print(f"manifest: {redact_url(join(args.output, MANIFEST))}", file=sys.stderr)
    return 0


def encode_units(
    args, source, codec: Codec, units: list[int], fs, root: str, encoding: dict, text_encoder: TextEncoder | None = None
) -> dict[str, Any]:
    """Decode in workers, encode batches here, write finished units in background threads."""
    stats = {"images": 0, "shards": 0, "bytes": 0, "skipped": [], "captions": text_counts()}
    if not units:
        return stats
    missing_captions = None if text_encoder is None else encoding["args"]["missing_captions"]
    loader = DataLoader(
        UnitImages(source, units, args.resolution, args.batch_size, missing_captions),
        batch_size=None,
        num_workers=min(args.num_workers, len(units)),
        collate_fn=_identity,
        pin_memory=codec_device(codec).type == "cuda",
        worker_init_fn=_decode_worker_init,
        prefetch_factor=4 if args.num_workers else None,
        persistent_workers=False,
    )
    total = sum(source.unit_size(u) for u in units) if isinstance(source, FolderSource) else None
    results: dict[int, UnitResult] = {}
    pending: deque[Future] = deque()

    def written(future: Future) -> None:
        record = future.result()
        stats["shards"] += len(record["shards"])
        stats["bytes"] += sum(s["bytes"] for s in record["shards"])

    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer") as writer,
        tqdm(total=total, unit="img", desc="encode", dynamic_ncols=True, mininterval=progress_interval()) as progress,
    ):
        for batch in loader:
            if batch.unit not in results:
                results[batch.unit] = UnitResult(captions=None if text_encoder is None else text_counts())
            result = results[batch.unit]
            if text_encoder is not None:
                members, truncated = text_members(text_encoder, batch.captions)
                result.text.extend(members)
                for first in (c[0] for c in batch.captions if c and c[0]):
                    if len(result.examples) < EXAMPLES and first not in result.examples:
                        result.examples.append(first)
                for counts in (result.captions, stats["captions"]):
                    counts["total"] += sum(map(len, batch.captions))
                    counts["max_per_image"] = max([counts["max_per_image"], *map(len, batch.captions)])
                    counts["truncated"] += truncated
                    counts["missing"] += batch.missing + sum(s["reason"] == "no caption" for s in batch.skipped)
            if len(batch.keys):
                images = batch.images
                if args.flip:
                    images = torch.cat([images, images.flip(-1)])  # one forward for both
                latents = codec.encode(images).cpu().to(torch.float16).numpy()
                result.latents.extend(latents[: len(batch.keys)])
                result.flipped.extend(latents[len(batch.keys) :])
                result.keys.extend(batch.keys)
                result.labels.extend(batch.labels)
                result.metadata.extend(batch.metadata)
            result.skipped.extend(batch.skipped)
            stats["images"] += len(batch.keys)
            stats["skipped"].extend(batch.skipped)
            progress.update(len(batch.keys) + len(batch.skipped))
            if batch.last:
                future = writer.submit(
                    write_unit, fs, root, batch.unit, results.pop(batch.unit), encoding, args.shard_size
                )
                pending.append(future)
                while len(pending) > 4:  # bound the memory held by finished units
                    written(pending.popleft())
        while pending:
            written(pending.popleft())
    return stats


def codec_device(codec: Codec) -> torch.device:
    return getattr(codec, "device", torch.device("cpu"))


def _identity(batch: ImageBatch) -> ImageBatch:
    return batch


def _decode_worker_init(worker_id: int) -> None:
    # Decoding is PIL's work: torch threads in workers would only fight the VAE for cores, and a
    # lower priority lets decoding fill the VAE's idle moments instead of preempting its threads.
    torch.set_num_threads(1)
    os.nice(19)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        return encode_part(args)
    except (InputError, ValueError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
