#!/usr/bin/env bash
# One Slurm task = one training rank. slurm/pretrain.sbatch runs this through `srun`, one task per
# GPU; it maps Slurm's task variables to the torch.distributed ones that
# ssa_megatron/training/distributed.py reads, then *replaces itself* with the trainer (exec), so
# Slurm's signals (the time-limit warning, SIGTERM on preemption/scancel) reach Python directly.
#   usage (inside a job step): srun slurm/launch.sh <pretrain flags...>
# MASTER_ADDR and MASTER_PORT come from the batch script (the job's first node).
set -euo pipefail
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 && !/^#SBATCH/ {sub(/^# ?/, ""); print}' "$0"; exit 0; }
[ -n "${SLURM_PROCID:-}" ] || { echo "error: slurm/launch.sh runs inside srun; for a single node use examples/launch_torchrun.sh" >&2; exit 2; }
: "${MASTER_ADDR:?set by slurm/pretrain.sbatch}" "${MASTER_PORT:?set by slurm/pretrain.sbatch}"
export RANK="$SLURM_PROCID"
export WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}"
export LOCAL_RANK="$SLURM_LOCALID"
export NODE_RANK="${SLURM_NODEID:-0}"
# tasks on this node: SLURM_STEP_TASKS_PER_NODE is like "8(x2)" or "8,7"; take this node's entry
export LOCAL_WORLD_SIZE="$(echo "${SLURM_STEP_TASKS_PER_NODE:-1}" | awk -v n="$NODE_RANK" -F, '
  { k = 0; for (i = 1; i <= NF; i++) { c = $i; r = 1; if (match(c, /\(x[0-9]+\)/)) {
      r = substr(c, RSTART + 2, RLENGTH - 3); c = substr(c, 1, RSTART - 1) }
      for (j = 0; j < r; j++) { if (k == n) { print c; exit } k++ } } }')"
if [ "${SSA_DEVICE:-gpu}" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
# Per-rank output when asked (SSA_RANK_LOGS=1): RUN_DIR/logs/<job>/rank<N>.log; rank 0 also prints.
if [ "${SSA_RANK_LOGS:-0}" = 1 ] && [ "$RANK" != 0 ] && [ -n "${RUN_DIR:-}" ]; then
  mkdir -p "$RUN_DIR/logs/${SLURM_JOB_ID:-job}"
  exec >> "$RUN_DIR/logs/${SLURM_JOB_ID:-job}/rank$RANK.log" 2>&1
fi
# A stop signal in the moment before Python has its handlers must not kill the rank: ignore both
# until then (an ignored signal stays ignored across exec; the handlers below replace that).
trap '' USR1 TERM
# The signal module installs the SIGTERM/SIGUSR1 handlers before anything heavy is imported, so a
# warning that arrives while the model or a checkpoint is still loading is kept, not fatal.
exec "${SSA_PYTHON:-python3}" -m ssa_megatron.training.signals ssa_megatron.training.pretrain "$@"
