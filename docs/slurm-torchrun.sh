#!/bin/bash
# drift run on several machines under Slurm: one torchrun per machine (one Slurm task each), each starting one
# drift process per GPU; the machines meet at the first machine of the allocation (torchrun's c10d rendezvous).
#
#   sbatch --nodes 2 docs/slurm-torchrun.sh --config configs/paper.toml --out /shared/runs/paper
#
# Everything after the script's name is passed to `drift run`. The output folder (and model.cache_dir) must be on
# a file system that every machine sees. Resubmitting the same command resumes the run where it stopped.
#SBATCH --job-name=drift
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=drift-%j.log
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-4}   # keep equal to --gpus-per-node
PORT=${PORT:-29500}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PYTHON=${PYTHON:-.venv/bin/python}

# Each rank's CPU threads (data loading, host-side work); the same value in every launch keeps resumes valid.
THREADS=$(( ${SLURM_CPUS_PER_TASK:-16} / GPUS_PER_NODE ))

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "drift-$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
    -m drift run --no-progress --set "run.threads=$(( THREADS > 0 ? THREADS : 1 ))" "$@"
