"""Check a latent dataset against its manifest; optionally decode samples back to a grid, a row per class.

python -m data_tools.inspect_shards URL [--grid out.png --n 64] [--storage-options JSON]

Checks every shard's presence, byte size, sha256, sample count, members, latent shape and
dtype, and finite values. Prints a summary and exits 1 on any mismatch.
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
from diffusion_dist.data.manifest import DatasetError, load_manifest
from diffusion_dist.data.shards import decode_npy, shard_problems
from diffusion_dist.data.storage import filesystem, join, read_bytes, redact_text, redact_url
from diffusion_dist.pictures import BACKGROUND, row_labels, save_grid


def check_shard(data: bytes, entry: dict[str, Any], manifest: dict[str, Any]) -> tuple[list[str], list[dict]]:
    """Problems found in one shard's bytes, and its samples: the loader's checks (shard_problems, plus
    the sha256), then every latent's shape, dtype and values."""
    members = ["latent.npy"] + (["latent_flip.npy"] if manifest["latent"].get("flip") else [])
    problems, samples = shard_problems(data, entry, members, check_hash=True)
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
    return problems, samples


def pick_for_grid(picked: dict[int | None, list[dict]], samples: list[dict], rows: int, columns: int) -> None:
    """Add the grid's samples among these to `picked`, as the shards stream by: one row per class (the
    first `rows` classes met, their first `columns` samples), or the first rows·columns unlabelled ones under None."""
    for sample in samples:
        label = int(bytes(sample["cls"])) if "cls" in sample else None
        if label not in picked and len(picked) < rows:
            picked[label] = []
        if label in picked and len(picked[label]) < (rows * columns if label is None else columns):
            picked[label].append(sample)


def decode_grid(picked: dict[int | None, list[dict]], manifest: dict[str, Any], columns: int, path: str) -> int:
    """Decode the posterior means of the picked samples and save them as one grid, `columns` wide: a
    labelled row per class (short rows padded with blank cells); returns the number of samples shown."""
    codec = codec_from_manifest(manifest["codec"])
    classes = sorted(c for c in picked if c is not None)
    rows = [picked[c] for c in classes] or [picked[None]]
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
    save_grid(path, cells, rows=len(rows), labels=row_labels(classes, names))
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
    picked: dict[int | None, list[dict]] = {}
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
            pick_for_grid(picked, samples, grid_rows, columns)

    labels = manifest.get("labels", {})
    print(
        f"{redact_url(args.url)}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({total_bytes / 2**20:.1f} MiB); codec {manifest['codec']['name']}"
        f" (scaling {manifest['codec']['scaling_factor']}); latent {manifest['latent']['layout']} "
        f"{manifest['latent']['shape']} float16{' + flips' if manifest['latent'].get('flip') else ''}; "
        f"{labels.get('num_classes', 0)} classes; {len(manifest.get('skipped', []))} inputs skipped at encoding"
    )
    for name, found in problems.items():
        for problem in found[:10]:
            print(f"MISMATCH {name}: {problem}")
    if args.grid and picked:
        shown = decode_grid(picked, manifest, columns, args.grid)
        print(f"grid of {shown} decoded samples: {args.grid}")
    print("OK" if not problems else f"{len(problems)} of {len(manifest['shards'])} shards have problems")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
