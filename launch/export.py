"""python -m launch.export RUN_DIR [--checkpoint PATH] [--out DIR]

Writes the inference export (EMA weights as safetensors + config JSON) from the newest
committed checkpoint of a run, without DeepSpeed and without GPUs: under ZeRO-3 the EMA
slices of every rank are reassembled.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion_dist.export import ExportInfo, write_export
from diffusion_dist.train.checkpoint import SHARED, committed_checkpoints, load_state, rank_file
from diffusion_dist.train.ema import assemble


def export_checkpoint(directory: Path, out: Path) -> Path:
    shared = load_state(directory / SHARED)
    layout = shared["ema_layout"]
    if layout["partitioned"]:
        ranks = len(list(directory.glob("rank-*.pt")))
        states = [load_state(rank_file(directory, r))["ema"] for r in range(ranks)]
    else:
        states = [shared["ema"]]
    info = ExportInfo.from_dict(shared["export"]).replace(step=shared["progress"]["step"])
    return write_export(out, assemble(layout, states), info)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest committed)")
    parser.add_argument("--out", default=None, help="default: RUN_DIR/export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_dir = Path(args.run_dir)
    checkpoints = [Path(args.checkpoint)] if args.checkpoint else committed_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        print(f"error: {run_dir / 'checkpoints'} holds no committed checkpoint", file=sys.stderr)
        return 2
    out = export_checkpoint(checkpoints[0], Path(args.out) if args.out else run_dir / "export")
    print(f"exported {checkpoints[0]} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
