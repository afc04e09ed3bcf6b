"""python -m launch.export RUN_DIR [--checkpoint PATH] [--out DIR] [--storage-options JSON]

Writes the inference export (EMA weights as safetensors + config JSON) from the newest
committed checkpoint of a run (or the one named), without DeepSpeed and without GPUs. Every
file read is checked against the checkpoint's commit; checkpoints hold the full EMA, and those
written before format 2 under ZeRO-3 have their per-rank slices reassembled.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_tools.encode_latents import json_options
from diffusion_dist.data.storage import redact_text
from diffusion_dist.export import write_export
from diffusion_dist.train.checkpoint import read_export_weights


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a checkpoint, <checkpoint dir>/step-<N> (default: the newest committed one in RUN_DIR/checkpoints)",
    )
    parser.add_argument("--out", default=None, help="default: RUN_DIR/export")
    parser.add_argument(
        "--storage-options", type=json_options, default={}, help="fsspec options for --checkpoint, as JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_dir = Path(args.run_dir)
    url, step = str(run_dir / "checkpoints"), None
    if args.checkpoint:
        url, _, name = args.checkpoint.rstrip("/").rpartition("/")
        step = int(name.removeprefix("step-")) if name.removeprefix("step-").isdigit() else -1
    try:
        with tempfile.TemporaryDirectory() as scratch:
            weights, info, null_text = read_export_weights(url or ".", step, args.storage_options, Path(scratch))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    out = write_export(Path(args.out) if args.out else run_dir / "export", weights, info, null_text=null_text)
    print(f"exported step {info.step} of {url} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
