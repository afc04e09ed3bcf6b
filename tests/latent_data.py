"""Writes small latent datasets in the shard format, with chosen shard sizes, for loader tests."""

from __future__ import annotations

import hashlib
import math

import numpy as np
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from diffusion_dist.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, manifest_bytes
from diffusion_dist.data.shards import encode_npy, tar_bytes


def write_dataset(
    root: str,
    shard_sizes: list[int],
    *,
    fs: AbstractFileSystem | None = None,
    shape: tuple[int, int, int] = (4, 4, 4),
    moments: bool = True,
    flip: bool = True,
    labelled: bool = True,
    num_classes: int = 5,
    mean: float = 1.0,
    std: float = 0.5,
    flip_mean: float = -1.0,
    scaling_factor: float = 0.5,
    shift_factor: float = 0.2,
) -> dict:
    """Shards of samples keyed "s<shard>/<index>"; latents are moments N(mean, std²) (flip: N(flip_mean, std²))."""
    fs = fs or LocalFileSystem()
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    channels = shape[0] * (2 if moments else 1)

    def latent(value: float) -> np.ndarray:
        if not moments:
            return np.full(shape, value, np.float16)
        return np.concatenate([np.full(shape, value, np.float16), np.full(shape, 2 * math.log(std), np.float16)])

    shards = []
    for shard, size in enumerate(shard_sizes):
        samples = []
        for i in range(size):
            sample = {"__key__": f"s{shard:03d}/{i:04d}", "latent.npy": encode_npy(latent(mean))}
            if flip:
                sample["latent_flip.npy"] = encode_npy(latent(flip_mean))
            if labelled:
                sample["cls"] = str((shard + i) % num_classes).encode()
            sample["json"] = b"{}"
            samples.append(sample)
        data = tar_bytes(samples)
        name = f"{shard:06d}-000.tar"
        fs.pipe_file(f"{root}/{name}", data)
        shards.append({"name": name, "samples": size, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "codec": {
            "name": "pixel",
            "model": None,
            "subfolder": None,
            "scaling_factor": scaling_factor,
            "shift_factor": shift_factor,
            "latent_channels": shape[0],
            "downsample": 1,
        },
        "latent": {
            "shape": [channels, *shape[1:]],
            "dtype": "float16",
            "layout": "moments" if moments else "sample",
            "moments": moments,
            "flip": flip,
        },
        "resolution": shape[-1],
        "labels": {"labelled": labelled, "num_classes": num_classes if labelled else 0, "class_names": None},
        "num_samples": sum(shard_sizes),
        "shards": shards,
        "skipped": [],
        "tool": {"name": "tests.latent_data", "version": "0", "args": {}},
    }
    fs.pipe_file(f"{root}/{MANIFEST}", manifest_bytes(manifest))
    return manifest
