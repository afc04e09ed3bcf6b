#!/bin/bash
# Train on a SLURM allocation: one task per GPU across all nodes, requeued on preemption.
#
#   sbatch slurm/train.sh CONFIG [section.key=value ...]
#   sbatch --nodes=4 --time=48:00:00 slurm/train.sh configs/imagenet256.yaml train.max_steps=400000
#
# Submit from the repository root with the Python environment active (the job inherits PATH;
# or set PYTHON=/path/to/python). Options on the sbatch command line override the defaults
# below; keep --ntasks-per-node equal to --gpus-per-node (one rank per GPU). On a CPU-only
# partition pass --gpus-per-node=0: ranks then use gloo.
#
# Preemption and time limits: the trainer treats SIGUSR1 and SIGTERM as "save and stop". SLURM
# sends SIGUSR1 --signal seconds before the time limit: every rank saves a checkpoint and exits
# with 75, and this script requeues the job. When the scheduler preempts or someone runs
# `scontrol requeue`, SLURM sends SIGTERM and requeues the job itself; the save must then finish
# within the cluster's KillWait. Either way the next start resumes from the newest committed
# checkpoint in run.dir and continues the same MLflow run; one log file collects every start.
#
# Failures: when one rank fails (an exception, or its process dies or freezes), every other rank
# logs "rank R failed: <error>" and exits 1 within seconds (diffusion_dist/train/watchdog.py); the
# failing rank's traceback is in this log. srun returns the highest task exit code, the failing
# rank's (2 bad config or data, 1 an error, 128+N killed by signal N): a failure is never requeued.
#
#SBATCH --job-name=diffusion-dist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

REQUEUE_EXIT_CODE=75  # launch.train: preempted after saving a checkpoint
PYTHON=${PYTHON:-python}

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: sbatch slurm/train.sh CONFIG [section.key=value ...]" >&2
    exit 2
fi
if [[ ! -f $1 ]]; then
    echo "error: config file '$1' not found (relative to $(pwd); submit from the repository root)" >&2
    exit 2
fi

# One rank per GPU: a mismatch would leave GPUs idle or put two ranks on one GPU.
gpus=${SLURM_GPUS_PER_NODE:-0}
gpus=${gpus##*:}  # "a100:8" -> 8
tasks=${SLURM_NTASKS_PER_NODE:-1}
if [[ $gpus -gt 0 && $gpus -ne $tasks ]]; then
    echo "error: --ntasks-per-node=$tasks but --gpus-per-node=$gpus; set both to the GPUs per node" >&2
    exit 2
fi

# Environment of every rank.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the first host of the allocation
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # same on every node, differs between jobs
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # data workers and the main process share cpus-per-task
# Since Slurm 22.05 srun does not take --cpus-per-task from the allocation: without this, CPU
# binding would give each rank and all its data workers one core.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export PYTHONUNBUFFERED=1
# NCCL (GPU nodes): fail fast instead of hanging on a lost peer: a collective that waits longer than
# run.collective_timeout_s becomes an error. Site-specific settings go in the environment before
# sbatch, e.g. NCCL_SOCKET_IFNAME=ib0 or NCCL_IB_HCA=mlx5, NCCL_DEBUG=WARN.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# gloo carries the per-step preemption flag on GPU nodes too; it takes interface names only (no ^lo).
if [[ -z ${GLOO_SOCKET_IFNAME:-} && -n ${NCCL_SOCKET_IFNAME:-} && ${NCCL_SOCKET_IFNAME} != ^* ]]; then
    export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
fi

echo "train.sh: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT, $(date -Is)"

# Bad config or overrides stop here, before any rank starts (world size = this allocation).
if ! SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$PYTHON" -m launch.train "$@" --print-config >/dev/null; then
    echo "error: the config does not run on $SLURM_NTASKS ranks (see above); nothing was started" >&2
    exit 2
fi

# --wait: once one rank has ended, the others get 60 s, then SLURM ends them. The ranks' watchdog
# ends them sooner; this is the backstop for a rank that fails before its watchdog starts (while
# joining the process group). Not --kill-on-bad-exit: after a preemption save all ranks exit with
# 75 together, and the first would kill the others before they exit.
srun --kill-on-bad-exit=0 --wait=60 "$PYTHON" -u -m launch.train "$@"
code=$?

if [[ $code -eq $REQUEUE_EXIT_CODE ]]; then
    echo "train.sh: preempted after a checkpoint; requeueing job $SLURM_JOB_ID ($(date -Is))"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "error: scontrol requeue failed: resubmit the same sbatch line to resume from the checkpoint" >&2
        exit $REQUEUE_EXIT_CODE
    fi
    exit 0
fi
echo "train.sh: training exited with $code ($(date -Is))"
exit $code
