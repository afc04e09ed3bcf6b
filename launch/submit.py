"""python -m launch.submit CONFIG --nodes N --gpus-per-node G [section.key=value ...] [--dry-run]

Submits training through submitit (SLURM, or `--cluster local` to debug on this machine) with
the resources of slurm/train.sh: one task per GPU on every node. The submitted callable is
checkpointable: SLURM sends SIGUSR2 `--signal-delay` seconds before the time limit (submitit's
convention), every rank saves a checkpoint at the next step boundary, and the job requeues
itself; the next start resumes from run.dir into the same MLflow run. SIGTERM (scancel, a
scheduler preemption) saves too but does not requeue: a preempting scheduler requeues itself. The config is checked
for the world size nodes × tasks per node before anything is submitted (exit 2 on bad input).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from diffusion_dist.config import ConfigError, load_config, to_yaml
from diffusion_dist.data.storage import redact_text

# The signal submitit asks SLURM for ahead of the time limit; the trainer saves on it.
PREEMPT_SIGNAL = "SIGUSR2"


class TrainJob(submitit.helpers.Checkpointable):
    """What every task of the job runs: launch.train in-process, ranks from submitit's environment."""

    def __init__(self, config_path: str, overrides: list[str]) -> None:
        self.config_path = str(Path(config_path).resolve())
        self.overrides = list(overrides)

    def __call__(self) -> int:
        # torch.distributed's variables from submitit's view of the job. CUDA_VISIBLE_DEVICES stays
        # as SLURM set it: the trainer picks cuda:LOCAL_RANK among the devices it sees.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from diffusion_dist.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag

        from . import train

        # The trainer takes SIGUSR2 from submitit's handler: the save is collective, so every rank
        # must take part (submitit would checkpoint on rank 0 alone and exit at once). SIGTERM
        # (scancel, scheduler preemption) also saves, but only the time-limit warning requeues.
        signals = f"run.preempt_signals=[{PREEMPT_SIGNAL},SIGTERM]"
        code = train.main([self.config_path, *self.overrides, signals])
        if code == REQUEUE_EXIT_CODE:
            environment = submitit.JobEnvironment()
            if environment.global_rank == 0 and PREEMPT_SIGNAL in PreemptionFlag.received:
                self._requeue()
            # Exit without a result: submitit would report a finished job to whoever waits on it.
            raise SystemExit(code)
        if code:
            raise RuntimeError(f"launch.train exited with {code}; see the log above")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The same job again: the run directory holds all state, so resuming needs nothing else."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_path, self.overrides))

    @staticmethod
    def _requeue() -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            job_id = os.environ["SLURM_JOB_ID"]  # this job (an array task has its own)
            logging.getLogger(__name__).warning("preempted after a checkpoint: requeueing job %s", job_id)
            subprocess.run(["scontrol", "requeue", job_id], check=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML, e.g. configs/imagenet256.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU partitions (gloo)")
    parser.add_argument(
        "--tasks-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node, or 1 on CPU)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=12)
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--signal-delay", type=int, default=300, help="seconds before the limit to save")
    parser.add_argument("--job-name", default="diffusion-dist")
    parser.add_argument("--cluster", choices=["slurm", "local"], default=None, help="default: SLURM if available")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and sbatch parameters")
    return parser.parse_intermixed_args(argv)


def sbatch_flags(args: argparse.Namespace, tasks: int) -> dict[str, Any]:
    """The sbatch options this submission asks for (what --dry-run prints)."""
    flags: dict[str, Any] = {
        "job-name": args.job_name,
        "nodes": args.nodes,
        "ntasks-per-node": tasks,
        "gpus-per-node": args.gpus_per_node or None,
        "cpus-per-task": args.cpus_per_task,
        "time": args.time,
        "signal": f"USR2@{args.signal_delay}",
        "requeue": True,
        "partition": args.partition,
        "account": args.account,
    }
    return {k: v for k, v in flags.items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = max(args.gpus_per_node, 1) if args.tasks_per_node is None else args.tasks_per_node
    problems = [
        f"--{name.replace('_', '-')} must be >= 1"
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time", "signal_delay")
        if getattr(args, name) is not None and getattr(args, name) < 1
    ]
    if args.gpus_per_node < 0:
        problems.append("--gpus-per-node must be >= 0")
    if args.signal_delay >= args.time * 60 >= 60:
        problems.append(f"--signal-delay {args.signal_delay} s is not shorter than --time {args.time} min; lower it")
    if args.gpus_per_node and tasks != args.gpus_per_node:
        problems.append(f"--tasks-per-node={tasks} but --gpus-per-node={args.gpus_per_node}: one rank per GPU")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    world = args.nodes * tasks
    try:
        config = load_config(args.config, args.overrides, world_size=world, training=True)
    except (ConfigError, ValueError) as e:
        print(f"error: {redact_text(str(e))} (for {args.nodes} nodes x {tasks} ranks)", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(config), end="")  # credentials redacted: the job itself gets the overrides as given
        print(f"# {world} ranks; sbatch parameters:")
        for key, value in sbatch_flags(args, tasks).items():
            print(f"#SBATCH --{key}" + ("" if value is True else f"={value}"))
        return 0

    folder = Path(config.run.dir) / "submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=args.cluster)
    if executor.cluster == "local" and args.nodes > 1:
        print("error: --cluster local runs on this machine only: use --nodes 1", file=sys.stderr)
        return 2
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        **({"gpus_per_node": args.gpus_per_node} if args.gpus_per_node else {}),
    )
    if executor.cluster == "slurm":
        executor.update_parameters(
            slurm_signal_delay_s=args.signal_delay,
            slurm_additional_parameters={"requeue": True},
            # As slurm/train.sh: srun takes cpus-per-task explicitly (Slurm >= 22.05), and ends the
            # other ranks a minute after one ended rather than at once (they exit 75 together).
            slurm_srun_args=["--cpus-per-task", str(args.cpus_per_task), "--kill-on-bad-exit=0", "--wait=60"],
            slurm_setup=["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"],
            **({"slurm_partition": args.partition} if args.partition else {}),
            **({"slurm_account": args.account} if args.account else {}),
        )
    job = executor.submit(TrainJob(args.config, args.overrides))
    print(f"submitted job {job.job_id} ({executor.cluster}, {world} ranks)")
    logs = Path(str(job.paths.stdout).replace(f"{job.job_id}_0_", f"{job.job_id}_<task>_"))
    print(f"  logs: {logs} and .err, one pair per task")
    print(f"  run:  {Path(config.run.dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
