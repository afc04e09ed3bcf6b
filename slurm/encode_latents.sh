#!/bin/bash
# Encode a dataset with a SLURM array: task i of N encodes part i, then a finalize job writes
# manifest.json once every task has ended.
#
#   sbatch --array=0-63 slurm/encode_latents.sh --input s3://bucket/images --output s3://bucket/in256 \
#       --vae stabilityai/sd-vae-ft-ema --resolution 256 --flip
#
# Arguments are those of `python -m data_tools.encode_latents` (without --rank/--world-size,
# which come from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT). The first task submits the
# finalize job with --dependency=afterany on the array: it writes the manifest from the finished
# parts, or names the parts that are missing (rerun the same sbatch line: finished shards are
# skipped). Output bytes do not depend on how many tasks split the work. Submit from the
# repository root with the Python environment active (or set PYTHON).
#
#SBATCH --job-name=encode-latents
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ ${ENCODE_FINALIZE:-0} == 1 ]]; then
    echo "encode_latents.sh: finalizing after array job ${ENCODE_ARRAY_JOB_ID:-?} ($(date -Is))"
    exec "$PYTHON" -m data_tools.encode_latents "$@" --finalize
fi

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "error: submit as an array: sbatch --array=0-<N-1> slurm/encode_latents.sh --input ... --output ..." >&2
    exit 2
fi
if [[ ${SLURM_ARRAY_TASK_MIN:-0} != 0 || $((SLURM_ARRAY_TASK_MAX + 1)) != "$SLURM_ARRAY_TASK_COUNT" ]]; then
    echo "error: the array must be 0-<N-1> with every index (got min ${SLURM_ARRAY_TASK_MIN:-?}," \
        "max ${SLURM_ARRAY_TASK_MAX:-?}, count $SLURM_ARRAY_TASK_COUNT); to finish a partial run, resubmit" \
        "the whole array: finished shards are skipped" >&2
    exit 2
fi
for argument in "$@"; do
    if [[ $argument == --rank* || $argument == --world-size* || $argument == --finalize ]]; then
        echo "error: $argument comes from the array (SLURM_ARRAY_TASK_ID / _COUNT); drop it" >&2
        exit 2
    fi
done

# The first task, on its first start only, queues the finalize step behind the whole array.
# Its log goes next to this task's.
if [[ $SLURM_ARRAY_TASK_ID == "${SLURM_ARRAY_TASK_MIN:-0}" && ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    logs=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | grep -oP 'StdOut=\K\S+')")
    sbatch --parsable --dependency="afterany:$SLURM_ARRAY_JOB_ID" --job-name="$SLURM_JOB_NAME-finalize" \
        --ntasks=1 --cpus-per-task=1 --gpus-per-task=0 --time=1:00:00 \
        --output="$logs/slurm-%x-%j.out" --export="ALL,ENCODE_FINALIZE=1,ENCODE_ARRAY_JOB_ID=$SLURM_ARRAY_JOB_ID" \
        "$0" "$@" | sed 's/^/encode_latents.sh: finalize job /'
fi

echo "encode_latents.sh: part $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT on $(hostname) ($(date -Is))"
"$PYTHON" -m data_tools.encode_latents "$@" --rank "$SLURM_ARRAY_TASK_ID" --world-size "$SLURM_ARRAY_TASK_COUNT"
