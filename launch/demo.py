"""python -m launch.demo [--text] [--run-dir runs/demo] [--ranks 2] [overrides ...]

The main job on its embedded default: writes scikit-learn's digits as an image folder,
encodes them with the lossless pixel codec into local shards, trains a small
class-conditional UNet with DeepSpeed ZeRO-2 on 2 CPU ranks (configs/demo.yaml), exports
the EMA weights and samples a classifier-free-guided grid of all ten digits. Everything
lands under --run-dir, MLflow tracking included (a local store in run-dir/mlflow unless
MLFLOW_TRACKING_URI names a server); the end prints the `mlflow ui` command that opens it.

--text does the same from captions (configs/demo_text.yaml, run dir runs/demo-text): several
phrasings per digit, encoded by a small seeded text encoder built here (no download), a
text-only UNet with cross-attention, and a grid of the prompts "the digit 0" ... "the digit 9".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from data_tools import encode_latents
from data_tools.make_digits import write_captions, write_digits
from data_tools.make_text_encoder import build_text_encoder
from diffusion_dist.distributed import process_from_env
from diffusion_dist.train.tracking import local_store, ui_command

from . import sample

ROOT = Path(__file__).parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--text", action="store_true", help="the text-to-image demo (configs/demo_text.yaml)")
    parser.add_argument("--run-dir", default=None, help="default: runs/demo, or runs/demo-text with --text")
    parser.add_argument("--ranks", type=int, default=2, help="CPU processes (DeepSpeed ranks)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for the demo's config")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir or ("runs/demo-text" if args.text else "runs/demo")).resolve()
    config = ROOT / "configs" / ("demo_text.yaml" if args.text else "demo.yaml")
    started = time.perf_counter()

    # Data: digits -> image folder (and captions, and a text encoder) -> latent shards (skipped when there).
    data = run_dir / "data"
    images, latents = data / "digits", data / "latents"
    if not images.exists():
        write_digits(images)
    encoding = ["--vae", "pixel", "--resolution", "8", "--shard-size", "200", "--num-workers", "1"]
    if args.text:
        if not (data / "text-encoder").exists():
            build_text_encoder(data / "text-encoder", kind="t5", seed=0)
        write_captions(images, data / "captions.jsonl")
        # 32 byte tokens hold the longest caption ("a handwritten seven" and its end marker).
        encoding += ["--captions", str(data / "captions.jsonl"), "--text-encoder", str(data / "text-encoder")]
        encoding += ["--text-max-length", "32"]
    if not (latents / "manifest.json").exists():
        code = encode_latents.main(["--input", str(images), "--output", str(latents), *encoding])
        if code:
            return code

    # Train on CPU ranks (torchrun), resuming if a previous demo was interrupted.
    port = process_from_env({}).master_port  # a free local port
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.ranks}",
        f"--master_port={port}",
        "-m",
        "launch.train",
        str(config),
        f"run.dir={run_dir}",
        f"data.url={latents}",
        *args.overrides,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    code = subprocess.call(command, env=env)
    if code:
        print(f"error: training exited with {code}; rerun the same command to resume", file=sys.stderr)
        return code

    # Sample a guided grid: one row per digit (per prompt "the digit <d>" for the text demo).
    prompts = [arg for d in range(10) for arg in ("--prompt", f"the digit {d}")] if args.text else []
    code = sample.main([str(run_dir), *prompts, "--per-class", "8", "--out", str(run_dir / "samples"), "--seed", "0"])
    if code:
        return code
    minutes = (time.perf_counter() - started) / 60
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    plots = ", ".join(p.name for p in sorted((run_dir / "plots").glob("*.png"))) or "none written"
    print(
        f"\ndemo done in {minutes:.1f} min\n"
        f"  sample grid (a labelled row per {'prompt' if args.text else 'digit 0-9'}, 8 px enlarged to 64): "
        f"{run_dir / 'samples.png'}\n"
        f"  raw samples (uint8 NHWC, labels): {run_dir / 'samples.npz'}; training grids: {run_dir / 'samples'}\n"
        f"  training curves: {run_dir / 'plots'} ({plots})\n"
        f"  export (EMA safetensors + config): {run_dir / 'export'}\n"
        f"  metrics: {run_dir / 'metrics.jsonl'}; checkpoints: {run_dir / 'checkpoints'}\n"
        f"  MLflow (experiment '{'demo-text' if args.text else 'demo'}'): "
        + (f"{tracking}" if tracking else f"{ui_command(local_store(run_dir)[0])}  then open http://127.0.0.1:5000")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
