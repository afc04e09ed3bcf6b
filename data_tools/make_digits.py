"""Write scikit-learn's bundled digits as a class-subfolder image folder: the offline demo dataset.

python -m data_tools.make_digits OUT_DIR [--limit N] [--captions FILE]

1797 grayscale 8×8 images in folders 0..9 (ImageNet layout), as PNG; pixel values 0..16
are scaled to 0..255. No download: the data ships inside scikit-learn. --captions also writes
a sidecar captions file for encode_latents --captions: several phrasings per image of its digit
("the digit 7", "a handwritten 7", "the digit seven", ...), the text demo's captions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out_dir: str | Path, limit: int | None = None) -> int:
    """Write the digits under out_dir/<label>/<index>.png; return how many were written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    count = len(images) if limit is None else min(limit, len(images))
    out = Path(out_dir)
    for index in range(count):
        folder = out / str(int(digits.target[index]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png")
    return count


NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_captions(digit: int) -> list[str]:
    """The phrasings a digit's images are captioned with; "the digit <d>" is the demo's prompt."""
    d, name = str(digit), NAMES[digit]
    return [f"the digit {d}", f"a handwritten {d}", f"the digit {name}", f"a handwritten {name}", f"the number {d}"]


def write_captions(images_dir: str | Path, path: str | Path) -> int:
    """A captions file (one JSON line per image: file relative to images_dir, its captions) for the
    digits under images_dir/<label>/; returns the number of lines."""
    root = Path(images_dir)
    lines = [
        json.dumps({"file": str(image.relative_to(root)), "captions": digit_captions(int(image.parent.name))})
        for image in sorted(root.glob("*/*.png"))
    ]
    Path(path).write_text("".join(line + "\n" for line in lines))
    return len(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_digits", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to create (class subfolders 0..9)")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N images")
    parser.add_argument("--captions", default=None, help="also write a captions file for encode_latents --captions")
    args = parser.parse_args(argv)
    count = write_digits(args.out_dir, args.limit)
    print(f"wrote {count} digit images to {args.out_dir}", file=sys.stderr)
    if args.captions:
        write_captions(args.out_dir, args.captions)
        print(f"wrote their captions to {args.captions}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
