"""python -m launch.train CONFIG [section.key=value ...] [--resume PATH | --no-resume] [--print-config]

Runs as one process, or under torchrun, srun or the deepspeed launcher (one process per
GPU). Exit codes: 0 done; 75 preempted after saving a checkpoint, or the data's storage
unreachable at start after retries (requeue me); 2 bad config or data (a wrong data.url or
credentials included), before training starts; 1 training failed,
on this rank or on another one (a full disk included: the message says so).

With more than one rank, a rank that fails tells the others (diffusion_dist/train/watchdog.py):
its error and traceback are in its own log, and within seconds every other rank logs
"rank R failed: <error>" and exits 1, even while blocked in a collective.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion_dist.config import Config, ConfigError, load_config, to_yaml
from diffusion_dist.data.manifest import DatasetError, load_manifest
from diffusion_dist.data.storage import StorageUnavailable, redact_text, redact_url
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
    try:
        check_data(config)
    except StorageUnavailable as e:
        # An outage, not a mistake: the requeue code, so that slurm/train.sh puts the job back in the queue.
        from diffusion_dist.train.preemption import REQUEUE_EXIT_CODE

        print(
            f"error: data.url={redact_url(config.data.url)}: storage unreachable ({redact_text(str(e))}); "
            f"exiting with {REQUEUE_EXIT_CODE} so that the scheduler requeues the job. If it repeats, check "
            "data.storage_options (endpoint_url) and that the storage is reachable from this node",
            file=sys.stderr,
        )
        return REQUEUE_EXIT_CODE
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    from diffusion_dist.train.watchdog import fail

    # fail(e): the other ranks, perhaps blocked in a collective, hear of it and end too.
    try:
        return train(config, process, resume=args.resume, fresh=args.no_resume)
    except (DatasetError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        fail(e)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        fail(e)
        return 1
    except OSError as e:
        fail(e)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A write into run.dir (config.yaml, metrics.jsonl, the export) found the disk or quota full;
        # most writes fail in write(), whose error carries no file name: name the run directory then.
        where = e.filename or Path(config.run.dir).resolve()
        what = "no space left on" if e.errno == errno.ENOSPC else "disk quota exceeded on"
        print(
            f"error: {what} {where}; free space there (or set run.dir on a larger disk) and rerun the same "
            "command: it resumes from the last checkpoint",
            file=sys.stderr,
        )
        return 1
    except BaseException as e:
        fail(e)
        raise  # the traceback, and exit code 1


def check_data(config: Config) -> None:
    """Read the dataset's manifest before any process group starts: a wrong data.url, endpoint or
    credential is a DatasetError naming the URL (exit 2), not a traceback after start-up."""
    url = config.data.url
    try:
        load_manifest(url, config.data.storage_options)
    except (DatasetError, StorageUnavailable):
        raise
    except PermissionError as e:
        raise DatasetError(
            f"data.url={redact_url(url)}: access denied ({_reason(e)}); check the credentials "
            "(data.storage_options key/secret, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        ) from None
    except ImportError as e:
        raise DatasetError(
            f"data.url={redact_url(url)}: no filesystem for this URL ({_reason(e)}); install its fsspec backend"
        ) from None
    except Exception as e:  # noqa: BLE001 - unreachable endpoints, bad URLs: whatever fsspec's backend raises
        raise DatasetError(
            f"data.url={redact_url(url)}: cannot read the dataset ({_reason(e)}); check the URL, "
            "data.storage_options (endpoint_url, credentials) and that the storage is reachable from this node"
        ) from None


def _reason(error: BaseException) -> str:
    return redact_text(str(error).splitlines()[0] if str(error) else type(error).__name__)[:500]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
