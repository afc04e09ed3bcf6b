"""Writes small latent datasets in the shard format, with chosen shard sizes, for loader tests."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import save as save_safetensors

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
    text: tuple[int, int, int | None] | None = None,
    max_captions: int = 3,
) -> dict:
    """Shards of samples keyed "s<shard>/<index>"; latents are moments N(mean, std²) (flip: N(flip_mean, std²)).

    text=(L, D, P or None): each sample also holds captions_of(shard, i, max_captions) and their
    "encoder outputs" text_rows(shard, i, k, L, D, P); the null text is null_text(L, D, P).
    """
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
            if text is not None:
                sample.update(text_members(shard, i, max_captions, *text))
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
    if text is not None:
        length, hidden, pooled = text
        counts = [len(captions_of(s, i, max_captions)) for s, n in enumerate(shard_sizes) for i in range(n)]
        manifest["text"] = {
            "encoder": {
                "name": "test",
                "class": "tests.latent_data",
                "max_length": length,
                "hidden_size": hidden,
                "pooled_size": pooled,
                "sha256": "0" * 64,
            },
            "null": NULL_TEXT,
            "captions": {
                "max_per_image": max(counts),
                "total": sum(counts),
                "truncated": 0,
                "missing": {"policy": "skip", "count": 0},
            },
            "examples": [captions_of(0, i, max_captions)[0] for i in range(min(8, shard_sizes[0]))],
        }
        fs.pipe_file(f"{root}/{NULL_TEXT}", save_safetensors(null_text(length, hidden, pooled)))
    fs.pipe_file(f"{root}/{MANIFEST}", manifest_bytes(manifest))
    return manifest


NULL_TEXT = "null_text.safetensors"


def captions_of(shard: int, i: int, max_captions: int) -> list[str]:
    """The K = 1 + (shard + 2i) mod max_captions captions of sample i of `shard`."""
    return [f"s{shard:03d}/{i:04d} caption {k}" for k in range(1 + (shard + 2 * i) % max_captions)]


def text_rows(shard: int, i: int, k: int, length: int, hidden: int, pooled: int | None) -> dict[str, torch.Tensor]:
    """Caption k's stand-in encoder output, exact in bfloat16: the embedding's first token is (shard, i, k),
    every other token k + 1; the mask has 2 + k tokens; the pooled vector is (k + 1, i, shard, ...)."""
    embedding = torch.full((length, hidden), k + 1.0)
    embedding[0, :3] = torch.tensor([shard, i, k], dtype=torch.float32)
    mask = torch.arange(length) < 2 + k
    rows = {"embedding": embedding.bfloat16(), "mask": mask}
    if pooled is not None:
        rows["pooled"] = torch.tensor([k + 1.0, i, shard] + [0.5] * (pooled - 3))[:pooled].bfloat16()
    return rows


def null_text(length: int, hidden: int, pooled: int | None) -> dict[str, torch.Tensor]:
    """The stand-in encoding of the empty string: embedding −1, one token, pooled −2."""
    null = {
        "embedding": torch.full((length, hidden), -1.0).bfloat16(),
        "mask": (torch.arange(length) < 1).to(torch.uint8),
    }
    if pooled is not None:
        null["pooled"] = torch.full((pooled,), -2.0).bfloat16()
    return null


def text_members(shard: int, i: int, max_captions: int, length: int, hidden: int, pooled: int | None) -> dict:
    """The text members of sample i of `shard` in the shard format: bfloat16 as uint16 bit patterns."""

    def bits(tensors: list[torch.Tensor]) -> bytes:
        return encode_npy(torch.stack(tensors).view(torch.int16).numpy().view(np.uint16))

    captions = captions_of(shard, i, max_captions)
    rows = [text_rows(shard, i, k, length, hidden, pooled) for k in range(len(captions))]
    members = {
        "text.npy": bits([r["embedding"] for r in rows]),  # (K, L, D) uint16
        "text_mask.npy": encode_npy(torch.stack([r["mask"] for r in rows]).numpy().astype(np.uint8)),  # (K, L)
        "captions.json": json.dumps(captions).encode(),
    }
    if pooled is not None:
        members["text_pooled.npy"] = bits([r["pooled"] for r in rows])  # (K, P) uint16
    return members
