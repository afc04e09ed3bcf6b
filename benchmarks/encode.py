"""Throughput of data_tools.encode_latents against a bare VAE loop, measured in one run.

python benchmarks/encode.py [--images 4000] [--resolution 64] [--batch-size 32] [--num-workers 1]

The bare loop runs the same VAE on the same images, already decoded and resized, in the
same batches: the most the tool could reach. The tool's figure is its whole command
(listing, decoding in workers, encoding, writing shards and manifest). Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools import encode_latents
from data_tools.images import center_crop_resize, decode_image
from diffusion_dist.codecs import load_codec


def make_images(folder: Path, count: int, size: int) -> None:
    """JPEG photos-like inputs (smooth gradients plus noise), larger than the target resolution."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), x * y], axis=-1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def make_vae(path: Path) -> None:
    """A small SD-like AutoencoderKL (downsampling 4), built from a config."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    ).save_pretrained(path)


def bare_loop(vae: Path, images: Path, resolution: int, batch_size: int) -> float:
    """Images/s of the VAE alone on pre-decoded batches."""
    codec = load_codec(str(vae))
    arrays = [center_crop_resize(decode_image(p.read_bytes()), resolution) for p in sorted(images.glob("*.jpg"))]
    batches = [
        torch.from_numpy(np.stack(arrays[i : i + batch_size])).permute(0, 3, 1, 2).contiguous()
        for i in range(0, len(arrays), batch_size)
    ]
    codec.encode(batches[0])  # warm up
    start = time.perf_counter()
    for batch in batches:
        codec.encode(batch).to(torch.float16).numpy()
    return len(arrays) / (time.perf_counter() - start)


def tool(vae: Path, images: Path, out: Path, resolution: int, batch_size: int, workers: int) -> float:
    """Images/s of the whole command."""
    start = time.perf_counter()
    code = encode_latents.main(
        [
            "--input",
            str(images),
            "--output",
            str(out),
            "--vae",
            str(vae),
            "--resolution",
            str(resolution),
            "--batch-size",
            str(batch_size),
            "--num-workers",
            str(workers),
        ]
    )
    assert code == 0
    return len(list(images.glob("*.jpg"))) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="enough that start-up is a small share")
    parser.add_argument("--source-size", type=int, default=160)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/tool rounds; medians are reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images, args.source_size)
        make_vae(tmp / "vae")
        # Alternate the two so drifts in machine load hit both alike.
        bares, wholes = [], []
        for round_ in range(args.rounds):
            bares.append(bare_loop(tmp / "vae", tmp / "images", args.resolution, args.batch_size))
            wholes.append(
                tool(
                    tmp / "vae",
                    tmp / "images",
                    tmp / f"out{round_}",
                    args.resolution,
                    args.batch_size,
                    args.num_workers,
                )
            )
        bare, whole = float(np.median(bares)), float(np.median(wholes))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"{args.images} JPEGs {args.source_size}px -> {args.resolution}px, batch {args.batch_size}, "
        f"{args.num_workers} decode worker(s)"
    )
    print(f"bare VAE loop:  {bare:8.1f} images/s (median of {args.rounds})")
    print(f"encode_latents: {whole:8.1f} images/s (median of {args.rounds})")
    print(
        f"ratio tool / bare: {whole / bare:.3f}  (target >= 0.9); per round: "
        + ", ".join(f"{w / b:.3f}" for w, b in zip(wholes, bares, strict=True))
    )


if __name__ == "__main__":
    main()
