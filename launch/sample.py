"""python -m launch.sample EXPORT_OR_RUN_DIR --classes 0,1,2 --per-class 8 --cfg-scale W --steps 50
       [--classifier CLASSIFIER_EXPORT --classifier-scale S] [--sampler ddim|ddpm] [--seed S] [--out FILE]
       [--device cuda]

Writes FILE.png, an image grid with one row per class, and FILE.npz with the decoded images
(uint8, NHWC) and their labels. Latents are decoded with the codec recorded at encoding.
Guidance: classifier-free (--cfg-scale, conditional models), classifier guidance with a
noisy-latent classifier trained with model.kind=classifier (--classifier, --classifier-scale),
or both; an unconditional model needs the classifier to follow --classes. --cfg-scale is w of
ε̃ = (1 + w)·ε_c − w·ε_∅ (w = 0: no guidance); DiT, GLIDE and diffusers write s = 1 + w, so
their 1.5 is --cfg-scale 0.5.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffusion_dist.data.storage import redact_text
from diffusion_dist.diffusion import SAMPLERS
from diffusion_dist.export import load_export
from diffusion_dist.inference import Guidance, check_classifier, generate_images
from diffusion_dist.pictures import row_labels, save_grid


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", default=None, help="a noisy-latent classifier export for classifier guidance")
    parser.add_argument(
        "--classifier-scale",
        type=float,
        default=1.0,
        help="s of classifier guidance (ADM's): DDPM moves the mean by s·Σ·∇log p(c | z_t), DDIM moves ε by "
        "−s·sqrt(1 − ᾱ_t)·∇log p(c | z_t)",
    )
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (respaced chain)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def load_models(args: argparse.Namespace, need_classes: bool = True) -> tuple:
    """(model, diffusion, info, classifier or None, number of classes to sample); ValueError says what is wrong.

    need_classes: refuse an unconditional model without a classifier (it cannot follow --classes)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, diffusion, info = load_export(args.export, args.device)
    if info.model.kind != "unet":
        raise ValueError(f"{args.export} is a {info.model.kind} export; sample from a diffusion model export")
    classifier = None
    num_classes = info.model.num_classes
    if args.classifier:
        classifier, _, classifier_info = load_export(args.classifier, args.device)
        check_classifier(info, classifier_info)
        num_classes = classifier_info.model.num_classes
    if args.classifier_scale < 0:
        raise ValueError(f"--classifier-scale {args.classifier_scale}: must be >= 0")
    if num_classes == 0 and need_classes:
        raise ValueError(f"{args.export} is unconditional: pass --classifier to sample classes")
    steps = args.steps or info.diffusion.sample_steps
    if not 1 <= steps <= diffusion.num_timesteps:
        raise ValueError(f"--steps {steps}: must lie in [1, {diffusion.num_timesteps}]")
    return model, diffusion, info, classifier, num_classes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sample", description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an export folder, or a run directory holding export/")
    parser.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="w of classifier-free guidance, ε̃ = (1 + w)·ε_c − w·ε_∅; DiT's/diffusers' scale is s = 1 + w "
        "(default: the export's diffusion.guidance_scale)",
    )
    parser.add_argument("--out", default="samples", help="output path without extension")
    add_guidance_arguments(parser)
    args = parser.parse_args(argv)

    try:
        model, diffusion, info, classifier, num_classes = load_models(args)
        classes = list(range(num_classes)) if args.classes is None else [int(c) for c in args.classes.split(",")]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes {bad} outside [0, {num_classes})")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    defaults = info.diffusion
    labels = [c for c in classes for _ in range(args.per_class)]
    cfg_scale = defaults.guidance_scale if args.cfg_scale is None else args.cfg_scale
    images = generate_images(
        model,
        diffusion,
        info,
        labels,
        Guidance(cfg_scale, classifier, args.classifier_scale),
        steps=args.steps or defaults.sample_steps,
        sampler=args.sampler or defaults.sampler,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(out.with_suffix(".png"), images, rows=len(classes), labels=row_labels(classes, info.dataset.class_names))
    np.savez_compressed(out.with_suffix(".npz"), images=images, labels=np.asarray(labels))
    print(f"wrote {len(images)} samples: {out.with_suffix('.png')} and {out.with_suffix('.npz')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
