"""python -m launch.sample EXPORT_OR_RUN_DIR --classes 0,1,2 --per-class 8 --cfg-scale W --steps 50
       [--classifier CLASSIFIER_EXPORT --classifier-scale S] [--sampler ddim|ddpm] [--seed S] [--out FILE]
       [--device cuda]
python -m launch.sample TEXT_EXPORT --prompt "a handwritten 7" [--prompt ...] [--prompts-file F]
       [--text-encoder FOLDER] --cfg-scale W ...

Writes FILE.png, an image grid with one row per class (or prompt), and FILE.npz with the decoded
images (uint8, NHWC), their labels (and prompts). A text model's prompts are encoded by the text
encoder its data was encoded with (another is refused) and guided against its recorded ∅.
Latents are decoded with the codec recorded at encoding. Guidance: classifier-free (--cfg-scale,
conditional models), classifier guidance with a noisy-latent classifier trained with
model.kind=classifier (--classifier, --classifier-scale), or both; an unconditional model needs
the classifier to follow --classes. --cfg-scale is w of
ε̃ = (1 + w)·ε_c − w·ε_∅ (w = 0: no guidance); DiT, GLIDE and diffusers write s = 1 + w, so
their 1.5 is --cfg-scale 0.5.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffusion_dist.data.storage import redact_text
from diffusion_dist.diffusion import SAMPLERS
from diffusion_dist.export import load_export, load_null_text
from diffusion_dist.inference import Guidance, check_classifier, encode_prompts, generate_images
from diffusion_dist.pictures import row_labels, save_grid


def scale(text: str) -> float:
    """argparse type of guidance scales: a finite number >= 0 (nan and inf would make every sample nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0 (0: no guidance)")
    return value


def count(minimum: int):
    """argparse type of an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its messages
    return parse


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", default=None, help="a noisy-latent classifier export for classifier guidance")
    parser.add_argument(
        "--classifier-scale",
        type=scale,
        default=1.0,
        help="s of classifier guidance (ADM's): DDPM moves the mean by s·Σ·∇log p(c | z_t), DDIM moves ε by "
        "−s·sqrt(1 − ᾱ_t)·∇log p(c | z_t)",
    )
    parser.add_argument(
        "--steps", type=count(1), default=None, help="sampling steps (respaced chain; default: the export's)"
    )
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def load_models(args: argparse.Namespace, need_classes: bool = True) -> tuple:
    """(model, diffusion, info, classifier or None, number of classes to sample); ValueError says what is wrong.

    need_classes: refuse an unconditional model without a classifier (it cannot follow --classes).
    Sets args.device and args.steps (None: the export's) to what will be used."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    model, diffusion, info = load_export(args.export, args.device)
    if info.model.kind != "unet":
        raise ValueError(f"{args.export} is a {info.model.kind} export; sample from a diffusion model export")
    classifier = None
    num_classes = info.model.num_classes
    if args.classifier:
        classifier, _, classifier_info = load_export(args.classifier, args.device)
        check_classifier(info, classifier_info)
        num_classes = classifier_info.model.num_classes
    if num_classes == 0 and need_classes and info.text_encoder is None:
        raise ValueError(f"{args.export} is unconditional: pass --classifier to sample classes")
    args.steps = info.diffusion.sample_steps if args.steps is None else args.steps  # 0 is an error, not the default
    if not 1 <= args.steps <= diffusion.num_timesteps:
        raise ValueError(f"--steps {args.steps}: must lie in [1, {diffusion.num_timesteps}]")
    return model, diffusion, info, classifier, num_classes


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """--classes '0,3,7' as ids in [0, num_classes); None: every class."""
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--classes {text!r}: give comma-separated class ids, e.g. --classes 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad} outside [0, {num_classes})")
    return classes


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeatable) then the lines of --prompts-file (blank lines ignored)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: cannot read it ({e})") from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file}: holds no prompt (one per line)")
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sample", description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an export folder, or a run directory holding export/")
    parser.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    parser.add_argument("--prompt", action="append", help="a text model's prompt (repeat for more rows)")
    parser.add_argument("--prompts-file", default=None, help="a text model's prompts, one per line")
    parser.add_argument(
        "--text-encoder",
        default=None,
        help="the text encoder to encode prompts with (default: the one the export names; a local folder of the "
        "same encoder works offline; another encoder is refused)",
    )
    parser.add_argument("--per-class", type=count(1), default=8, help="samples per class or prompt")
    parser.add_argument(
        "--cfg-scale",
        type=scale,
        default=None,
        help="w of classifier-free guidance, ε̃ = (1 + w)·ε_c − w·ε_∅; DiT's/diffusers' scale is s = 1 + w "
        "(default: the export's diffusion.guidance_scale)",
    )
    parser.add_argument("--out", default="samples", help="output path without extension")
    add_guidance_arguments(parser)
    args = parser.parse_args(argv)

    try:
        model, diffusion, info, classifier, num_classes = load_models(args)
        prompts = read_prompts(args)
        text = null_text = None
        if prompts or info.text_encoder is not None:
            if info.text_encoder is None:
                raise ValueError(f"{args.export} is not a text model: sample it with --classes")
            null_text, null_label = load_null_text(args.export, info), info.model.num_classes
            if args.classes is not None and null_label == 0:
                raise ValueError(f"{args.export} takes no class labels: give --prompt or --prompts-file alone")
            if not prompts and (args.classes is None or null_label == 0):
                raise ValueError(
                    f"{args.export} is a text model: give --prompt or --prompts-file"
                    + (" (or --classes alone: class rows with the null text)" if null_label else "")
                )
            # A model of class and text was trained on each alone too: a row is a prompt (class ∅),
            # a class (null text), or a prompt and a class when --classes pairs one with each prompt.
            classes = parse_classes(args.classes, null_label) if args.classes is not None else []
            if prompts and classes and len(classes) != len(prompts):
                raise ValueError(
                    f"--classes gives {len(classes)} classes for {len(prompts)} prompts: give one class per prompt "
                    "(a row each), or leave --classes out"
                )
            if prompts:
                rows = [prompt for prompt in prompts for _ in range(args.per_class)]
                text = encode_prompts(info, rows, args.device, args.text_encoder)
                names = row_labels(classes, info.dataset.class_names) if classes else []
                grid_labels = [f"{p} ({n})" for p, n in zip(prompts, names, strict=True)] if classes else prompts
                classes = classes or [null_label] * len(prompts)
            else:
                rows = len(classes) * args.per_class
                text = {k: v.unsqueeze(0).expand(rows, *v.shape) for k, v in null_text.items()}
                grid_labels = row_labels(classes, info.dataset.class_names)
        else:
            classes = parse_classes(args.classes, num_classes)
            grid_labels = row_labels(classes, info.dataset.class_names)
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
        steps=args.steps,
        sampler=args.sampler or defaults.sampler,
        seed=args.seed,
        device=args.device,
        progress=True,
        text=text,
        null_text=null_text,
    )
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(out.with_suffix(".png"), images, rows=len(classes), labels=grid_labels)
        extra = {"prompts": np.asarray([p for p in prompts for _ in range(args.per_class)])} if prompts else {}
        np.savez_compressed(out.with_suffix(".npz"), images=images, labels=np.asarray(labels), **extra)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: no space left on {e.filename or out.parent.resolve()} (--out {args.out})", file=sys.stderr)
        else:
            print(f"error: --out {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"wrote {len(images)} samples: {out.with_suffix('.png')} and {out.with_suffix('.npz')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
