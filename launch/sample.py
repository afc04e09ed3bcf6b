"""python -m launch.sample EXPORT_OR_RUN_DIR --classes 0,1,2 --per-class 8 --cfg-scale W --steps 50
       [--sampler ddim|ddpm] [--seed S] [--out FILE] [--device cuda]

Writes FILE.png, an image grid with one row per class, and FILE.npz with the decoded images
(uint8, NHWC) and their labels. Latents are decoded with the codec recorded at encoding.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_dist.diffusion import SAMPLERS
from diffusion_dist.inference import generate_images, image_grid
from diffusion_dist.train.export import load_export


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sample", description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an export folder, or a run directory holding export/")
    parser.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=None, help="w of classifier-free guidance")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (respaced chain)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples", help="output path without extension")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    try:
        model, diffusion, info = load_export(args.export, args.device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    num_classes = info["model"]["num_classes"]
    classes = list(range(num_classes)) if args.classes is None else [int(c) for c in args.classes.split(",")]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        print(f"error: --classes {bad} outside [0, {num_classes})", file=sys.stderr)
        return 2
    defaults = info["diffusion"]
    labels = [c for c in classes for _ in range(args.per_class)]
    images = generate_images(
        model,
        diffusion,
        info,
        labels,
        cfg_scale=defaults["guidance_scale"] if args.cfg_scale is None else args.cfg_scale,
        steps=args.steps or defaults["sample_steps"],
        sampler=args.sampler or defaults["sampler"],
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, rows=len(classes))).save(out.with_suffix(".png"))
    np.savez_compressed(out.with_suffix(".npz"), images=images, labels=np.asarray(labels))
    print(f"wrote {len(images)} samples: {out.with_suffix('.png')} and {out.with_suffix('.npz')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
