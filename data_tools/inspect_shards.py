"""Check a latent dataset against its manifest; optionally decode samples back to a grid, a row per class.

python -m data_tools.inspect_shards URL [--grid out.png --n 64] [--storage-options JSON]

Checks every shard's presence, byte size, sha256, sample count, members, latent shape and
dtype, and finite values; for captioned data also the text members (shapes against the
manifest's encoder, at least one caption, finite values) and null_text.safetensors. Prints a
summary and exits 1 on any mismatch. The grid of a captioned dataset has a row per caption.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data_tools import progress_interval
from diffusion_dist.codecs import codec_from_manifest
from diffusion_dist.data.manifest import DatasetError, load_manifest, load_null_text
from diffusion_dist.data.shards import decode_npy, shard_problems
from diffusion_dist.data.storage import filesystem, join, read_bytes, redact_text, redact_url
from diffusion_dist.pictures import BACKGROUND, row_labels, save_grid
from diffusion_dist.text import from_bf16_bits

TEXT_MEMBERS = ("text.npy", "text_mask.npy", "captions.json")  # plus text_pooled.npy with a pooled vector


def text_members(manifest: dict[str, Any]) -> list[str]:
    """The text members every sample of this dataset holds (none without captions)."""
    if "text" not in manifest:
        return []
    pooled = manifest["text"]["encoder"]["pooled_size"] is not None
    return [*TEXT_MEMBERS, *(["text_pooled.npy"] if pooled else [])]


def check_text(sample: dict, encoder: dict[str, Any]) -> list[str]:
    """Problems with one sample's text members: K >= 1 captions, text.npy uint16 (K, L, D), text_mask.npy
    uint8 (K, L) of 0/1, text_pooled.npy uint16 (K, P), finite bfloat16 values, captions.json K strings."""
    key, L, D, P = sample["__key__"], encoder["max_length"], encoder["hidden_size"], encoder["pooled_size"]
    try:
        captions = json.loads(bytes(sample["captions.json"]))
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{key}: captions.json is not valid JSON ({e})"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        return [f"{key}: captions.json is not a non-empty list of strings"]
    K, problems = len(captions), []
    expected = {"text.npy": (np.uint16, (K, L, D)), "text_mask.npy": (np.uint8, (K, L))}
    if P is not None:
        expected["text_pooled.npy"] = (np.uint16, (K, P))
    for member, (dtype, shape) in expected.items():
        try:
            array = decode_npy(sample[member])
        except ValueError as e:
            problems.append(f"{key}: {member} is not a readable .npy ({e})")
            continue
        if array.dtype != dtype or array.shape != shape:
            problems.append(
                f"{key}: {member} is {array.dtype}{list(array.shape)}, {K} captions and the manifest's encoder "
                f"give {np.dtype(dtype)}{list(shape)}"
            )
        elif member == "text_mask.npy" and not np.isin(array, (0, 1)).all():
            problems.append(f"{key}: text_mask.npy holds values other than 0 and 1")
        elif dtype == np.uint16 and not torch.isfinite(from_bf16_bits(array)).all():
            problems.append(f"{key}: {member} holds NaN or inf")
    return problems


def check_shard(data: bytes, entry: dict[str, Any], manifest: dict[str, Any]) -> tuple[list[str], list[dict]]:
    """Problems found in one shard's bytes, and its samples: the loader's checks (shard_problems, plus
    the sha256), then every latent's shape, dtype and values."""
    members = ["latent.npy"] + (["latent_flip.npy"] if manifest["latent"].get("flip") else [])
    problems, samples = shard_problems(data, entry, members + text_members(manifest), check_hash=True)
    shape = tuple(manifest["latent"]["shape"])
    for sample in samples:
        for member in (m for m in members if m in sample):
            try:
                array = decode_npy(sample[member])
            except ValueError as e:
                problems.append(f"{sample['__key__']}: {member} is not a readable .npy ({e})")
                continue
            if array.shape != shape or array.dtype != np.float16:
                problems.append(
                    f"{sample['__key__']}: {member} is {array.dtype}{list(array.shape)}, "
                    f"the manifest says float16{list(shape)}"
                )
            elif not np.isfinite(array).all():
                problems.append(f"{sample['__key__']}: {member} holds NaN or inf")
        if "text" in manifest and all(m in sample for m in text_members(manifest)):
            problems += check_text(sample, manifest["text"]["encoder"])
    return problems, samples


def first_caption(sample: dict) -> str | None:
    try:
        captions = json.loads(bytes(sample["captions.json"]))
        return captions[0] if isinstance(captions[0], str) else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def pick_for_grid(
    picked: dict[int | str | None, list[dict]], samples: list[dict], rows: int, columns: int, captions: bool = False
) -> None:
    """Add the grid's samples among these to `picked`, as the shards stream by: one row per class (the
    first `rows` classes met, their first `columns` samples), or the first rows·columns unlabelled ones under None.
    With `captions`, a row per caption instead: the first `rows` first-captions met, their first `columns` samples."""
    for sample in samples:
        if captions:
            label = first_caption(sample)
            if label is None:
                continue  # reported by check_text
        else:
            label = int(bytes(sample["cls"])) if "cls" in sample else None
        if label not in picked and len(picked) < rows:
            picked[label] = []
        if label in picked and len(picked[label]) < (rows * columns if label is None else columns):
            picked[label].append(sample)


def decode_grid(picked: dict[int | str | None, list[dict]], manifest: dict[str, Any], columns: int, path: str) -> int:
    """Decode the posterior means of the picked samples and save them as one grid, `columns` wide: a
    labelled row per class, or per caption in the order met (short rows padded with blank cells);
    returns the number of samples shown."""
    codec = codec_from_manifest(manifest["codec"])
    by_caption = any(isinstance(c, str) for c in picked)
    classes = list(picked) if by_caption else sorted(c for c in picked if c is not None)
    rows = [picked[c] for c in classes] or [picked[None]]
    if by_caption:
        columns = max(map(len, rows))  # unique captions: one sample a row, no empty columns
    samples = [s for row in rows for s in row]
    latents = torch.from_numpy(np.stack([decode_npy(s["latent.npy"]) for s in samples])).float()
    if manifest["latent"]["moments"]:
        latents = latents.chunk(2, dim=1)[0]  # the mean of [mean, log-variance]
    images = codec.decode(latents).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if not classes:
        save_grid(path, images, rows=math.ceil(len(images) / columns))
        return len(images)
    cells = np.empty((len(rows) * columns, *images.shape[1:3], 3), dtype=np.uint8)
    cells[:] = BACKGROUND
    start = 0
    for r, row in enumerate(rows):
        cells[r * columns : r * columns + len(row)] = images[start : start + len(row)]
        start += len(row)
    names = (manifest.get("labels") or {}).get("class_names")
    labels = classes if by_caption else row_labels(classes, names)
    save_grid(path, cells, rows=len(rows), labels=labels)
    return len(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.inspect_shards", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="dataset prefix holding manifest.json")
    parser.add_argument("--grid", default=None, help="write decoded samples to this PNG")
    parser.add_argument(
        "--n", type=int, default=64, help="samples in the grid (labelled data: a row per class, the first classes met)"
    )
    parser.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: the grid needs at least one sample")
    try:
        manifest = load_manifest(args.url, args.storage_options)
    except (DatasetError, OSError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 1
    fs, root = filesystem(args.url, args.storage_options)
    problems: dict[str, list[str]] = {}
    # The grid as close to --n samples as a square of whole rows allows.
    columns = math.ceil(math.sqrt(args.n))
    grid_rows = math.ceil(args.n / columns)
    picked: dict[int | str | None, list[dict]] = {}
    total_bytes = 0
    for entry in tqdm(manifest["shards"], unit="shard", desc="inspect", mininterval=progress_interval()):
        try:
            data = read_bytes(fs, join(root, entry["name"]))
        except OSError as e:
            problems[entry["name"]] = [f"cannot read: {redact_text(str(e))}"]
            continue
        total_bytes += len(data)
        found, samples = check_shard(data, entry, manifest)
        if found:
            problems[entry["name"]] = found
        if args.grid:
            pick_for_grid(picked, samples, grid_rows, columns, captions="text" in manifest)
    text = manifest.get("text")
    if text is not None:
        try:
            null = load_null_text(args.url, args.storage_options, manifest)
            if not all(torch.isfinite(t).all() for t in null.values()):
                problems[text["null"]] = ["holds NaN or inf"]
        except (DatasetError, OSError) as e:
            problems[text["null"]] = [redact_text(str(e))]

    labels = manifest.get("labels", {})
    print(
        f"{redact_url(args.url)}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({total_bytes / 2**20:.1f} MiB); codec {manifest['codec']['name']}"
        f" (scaling {manifest['codec']['scaling_factor']}); latent {manifest['latent']['layout']} "
        f"{manifest['latent']['shape']} float16{' + flips' if manifest['latent'].get('flip') else ''}; "
        f"{labels.get('num_classes', 0)} classes; {len(manifest.get('skipped', []))} inputs skipped at encoding"
    )
    if text is not None:
        encoder, captions = text["encoder"], text["captions"]
        pooled = f" + pooled {encoder['pooled_size']}" if encoder["pooled_size"] is not None else ""
        print(
            f"text: {encoder['class']} {encoder['name']!r} (sha256 {encoder['sha256'][:12]}), tokens "
            f"[{encoder['max_length']}, {encoder['hidden_size']}]{pooled} bfloat16; {captions['total']} captions "
            f"(at most {captions['max_per_image']} per image), {captions['truncated']} truncated, "
            f"{captions['missing']['count']} images without one ({captions['missing']['policy']})"
        )
    for name, found in problems.items():
        for problem in found[:10]:
            print(f"MISMATCH {name}: {problem}")
    if args.grid and picked:
        shown = decode_grid(picked, manifest, columns, args.grid)
        print(f"grid of {shown} decoded samples: {args.grid}")
    bad_shards = len(problems) - (text is not None and text["null"] in problems)
    summary = f"{bad_shards} of {len(manifest['shards'])} shards have problems"
    if text is not None and text["null"] in problems:
        summary += f"; so has {text['null']}"
    print("OK" if not problems else summary)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
