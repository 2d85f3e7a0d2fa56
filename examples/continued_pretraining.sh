#!/usr/bin/env bash
# Continued SSA pretraining of an existing Hugging Face model (Llama 2 / 3 / 3.1 / 3.2, Mistral,
# Qwen2, Qwen3, Phi-3) at a longer context on this machine: import (tools/convert_checkpoint.py
# from-hf), then train slurm/configs/continued.sh with torchrun (examples/launch_torchrun.sh): the
# model flags the importer records, a longer --seq-length and a RoPE change. Rerunning resumes.
# On Slurm: the same config with sbatch (its header). Why these settings: examples/README.md,
# "Continued pretraining of an existing model".
#
#   HF_MODEL=/models/Llama-3.2-1B DATA_PATH=data/llama32 SEQ_LENGTH=32768 \
#     TP=2 bash examples/continued_pretraining.sh
#
# HF_MODEL      HF directory (config.json + *.safetensors)
# DATA_PATH     .bin/.idx prefix made with the model's own tokenizer (the trainer refuses data
#               of another tokenizer file):
#               tools/preprocess_data.py --tokenizer $HF_MODEL ...
# OUT           runs/continued-NAME: OUT/imported (the import), OUT/checkpoints, OUT/tensorboard
# SEQ_LENGTH, ROPE, ROPE_BASE_FACTOR, LR, MIN_LR, WARMUP_ITERS, TRAIN_ITERS, GLOBAL_BATCH,
# MICRO_BATCH, TP, BLOCK_COUNTS, SPLIT (998,2,0; a small corpus needs e.g. 90,10,0 for a
# validation split): slurm/configs/continued.sh. NPROC_PER_NODE (one per GPU), SSA_DEVICE=cpu
# (a CPU smoke run: gloo, fp32), EXTRA_ARGS (more pretrain.py flags).
# Relative paths are taken from the current directory.
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; }
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
HF_MODEL="${HF_MODEL:?set HF_MODEL to a Hugging Face model directory}"
: "${DATA_PATH:?set DATA_PATH to a .bin/.idx prefix tokenized with the tokenizer of HF_MODEL}"
OUT="${OUT:-$ROOT/runs/continued-$(basename "$HF_MODEL")}"
# relative paths are where you are, not the checkout (the scripts run from the checkout)
[[ "$HF_MODEL" = /* ]] || HF_MODEL="$PWD/$HF_MODEL"
[[ "$DATA_PATH" = /* ]] || DATA_PATH="$PWD/$DATA_PATH"
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
mkdir -p "$OUT"
IMPORTED="$OUT/imported"
if [ ! -f "$IMPORTED/latest" ]; then
  "$PY" "$ROOT/tools/convert_checkpoint.py" from-hf --input "$HF_MODEL" --output "$IMPORTED" \
    --tensor-model-parallel-size "${TP:-1}" | tee "$OUT/import.log"
fi
cd "$ROOT"
INIT_FROM="$IMPORTED" RUN_DIR="$OUT" RUN_NAME="${RUN_NAME:-continued-$(basename "$HF_MODEL")}" \
  DATA_PATH="$DATA_PATH" SSA_PYTHON="${SSA_PYTHON:-$PY}" \
  SSA_EXTRA_ARGS="${SSA_EXTRA_ARGS:-} ${EXTRA_ARGS:-}" \
  NPROC_PER_NODE="${NPROC_PER_NODE:-$([ "${SSA_DEVICE:-}" = cpu ] && echo 1 || true)}" \
  exec bash "$ROOT/examples/launch_torchrun.sh" "$ROOT/slurm/configs/continued.sh"
