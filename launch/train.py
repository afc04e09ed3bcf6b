"""python -m launch.train CONFIG [section.key=value ...] [--resume PATH | --no-resume] [--print-config]

Runs as one process, or under torchrun, srun or the deepspeed launcher (one process per
GPU). Exit codes: 0 done; 75 preempted after saving a checkpoint (requeue me); 2 bad
config or data, before training starts; 1 training failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from diffusion_dist.config import ConfigError, load_config, to_yaml
from diffusion_dist.data.manifest import DatasetError
from diffusion_dist.data.storage import redact_text
from diffusion_dist.distributed import process_from_env
from diffusion_dist.evaluation import EvaluationError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train",
        description="Train a conditional latent diffusion model with DeepSpeed ZeRO.",
    )
    parser.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=1000")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (secrets redacted) and exit"
    )
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", default=None, help="resume from this checkpoint directory")
    group.add_argument("--no-resume", action="store_true", help="start fresh even if run.dir has checkpoints")
    return parser.parse_intermixed_args(argv)  # options may come between or after the overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        process = process_from_env()
        config = load_config(args.config, args.overrides, world_size=process.world_size, training=True)
    except (ConfigError, ValueError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    logging.basicConfig(
        level=logging.INFO if process.rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{process.rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    # MLflow: the tracker's thread retries for as long as the run lasts, MLflow's own retries (7,
    # exponential: minutes per call) would only hold its queue back; and run URLs printed to
    # stdout could carry user:password@ from the tracking URI.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from diffusion_dist.train.loop import TrainingAborted, train

    try:
        return train(config, process, resume=args.resume, fresh=args.no_resume)
    except (DatasetError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
