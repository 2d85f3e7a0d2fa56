#!/usr/bin/env bash
# Continued SSA pretraining of an existing Hugging Face model (Llama 2 / 3 / 3.1 / 3.2, Mistral,
# Qwen2, Qwen3, Phi-3) at a longer context: import (tools/convert_checkpoint.py from-hf), then
# train with the model flags the importer prints, a longer --seq-length and a RoPE change.
# Rerunning resumes.
# Why these settings: examples/README.md, "Continued pretraining of an existing model".
#
#   HF_MODEL=/models/Llama-3.2-1B DATA_PATH=data/llama32 SEQ_LENGTH=32768 \
#     TP=2 bash examples/continued_pretraining.sh
#
# HF_MODEL      HF directory (config.json + *.safetensors)
# DATA_PATH     .bin/.idx prefix made with the model's own tokenizer:
#               tools/preprocess_data.py --tokenizer $HF_MODEL/tokenizer.json ...
# SEQ_LENGTH    the new context (default: 4 x the model's)
# ROPE          auto (default): keep a model's llama3 scaling; otherwise, when SEQ_LENGTH exceeds
#               the model's context, llama3 scaling by SEQ_LENGTH / context (Llama-3.1's recipe)
#               | scaling (that, always) | base (--rotary-base x ROPE_BASE_FACTOR, default 8)
#               | keep (RoPE as imported)
# LR (3e-5), MIN_LR (LR / 10), WARMUP_ITERS (100), TRAIN_ITERS (2000), GLOBAL_BATCH (64),
# MICRO_BATCH (1), TP (1), NPROC_PER_NODE (one per GPU), BLOCK_COUNTS (16), OUT (runs/continued-NAME),
# SPLIT (998,2,0; a small corpus needs e.g. 90,10,0 for a validation split),
# SSA_DEVICE=cpu (a CPU smoke run: gloo, fp32), EXTRA_ARGS (more pretrain.py flags)
# Relative paths are taken from the current directory.
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; }
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
HF_MODEL="${HF_MODEL:?set HF_MODEL to a Hugging Face model directory}"
DATA_PATH="${DATA_PATH:?set DATA_PATH to a .bin/.idx prefix tokenized with the tokenizer of HF_MODEL}"
OUT="${OUT:-$ROOT/runs/continued-$(basename "$HF_MODEL")}"
# relative paths are where you are, not the checkout (the script runs from the checkout)
[[ "$HF_MODEL" = /* ]] || HF_MODEL="$PWD/$HF_MODEL"
[[ "$DATA_PATH" = /* ]] || DATA_PATH="$PWD/$DATA_PATH"
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
TP="${TP:-1}"
cd "$ROOT"
mkdir -p "$OUT"

IMPORTED="$OUT/imported"
if [ ! -f "$IMPORTED/latest" ]; then
  "$PY" tools/convert_checkpoint.py from-hf --input "$HF_MODEL" --output "$IMPORTED" \
    --tensor-model-parallel-size "$TP" | tee "$OUT/import.log"
fi
# the model's own flags: shape, RoPE, --untie-embeddings-and-output-weights, --add-qkv-bias, ...
read -r -a MODEL_FLAGS <<< "$(sed -n 's/^train it with these model flags[^:]*: //p' "$OUT/import.log")"
read -r CONTEXT BASE SCALED FACTOR < <("$PY" -c '
import json, sys
a = json.load(open(sys.argv[1]))["args"]
print(a["seq_length"], a["rotary_base"], int(bool(a.get("use_rope_scaling"))), a.get("rope_scaling_factor") or 1)
' "$IMPORTED/iter_0000000/ssa_meta.json")
SEQ_LENGTH="${SEQ_LENGTH:-$((4 * CONTEXT))}"

ROPE="${ROPE:-auto}"
if [ "$ROPE" = auto ]; then
  if [ "$SCALED" = 1 ] || [ "$SEQ_LENGTH" -le "$CONTEXT" ]; then ROPE=keep; else ROPE=scaling; fi
fi
case "$ROPE" in
  keep) ROPE_FLAGS=() ;;
  scaling)  # llama3 scaling of the unscaled frequencies, from the model's own context
    ROPE_FLAGS=(--use-rope-scaling --rope-scaling-type llama3
                --rope-scaling-factor "$("$PY" -c "print($SEQ_LENGTH / $CONTEXT)")"
                --rope-scaling-original-max-position-embeddings "$CONTEXT")
    [ "$SCALED" = 1 ] && echo "note: the model already scales RoPE (factor $FACTOR); ROPE=scaling replaces it" ;;
  base) ROPE_FLAGS=(--rotary-base "$("$PY" -c "print($BASE * ${ROPE_BASE_FACTOR:-8})")") ;;
  *) echo "ROPE=$ROPE: use auto, scaling, base or keep" >&2; exit 2 ;;
esac

LOAD="$IMPORTED"  # weights only: fresh optimizer, iteration 0
[ -f "$OUT/checkpoints/latest" ] && LOAD="$OUT/checkpoints"  # resume
LR="${LR:-3e-5}"
MIN_LR="${MIN_LR:-$("$PY" -c "print($LR / 10)")}"
if [ "${SSA_DEVICE:-}" = cpu ]; then
  NPROC_PER_NODE="${NPROC_PER_NODE:-1}"; PRECISION=()
else
  NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
  PRECISION=(--bf16 --recompute-activations)
fi
echo "continued pretraining: seq $SEQ_LENGTH (model context $CONTEXT), RoPE $ROPE ${ROPE_FLAGS[*]:-}, load $LOAD"
exec "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" \
  -m ssa_megatron.training.signals ssa_megatron.training.pretrain \
  "${MODEL_FLAGS[@]}" --seq-length "$SEQ_LENGTH" "${ROPE_FLAGS[@]}" \
  --attention-mode ssa --ssa-block-size 16 --ssa-block-counts "${BLOCK_COUNTS:-16}" \
  --micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:-64}" \
  --train-iters "${TRAIN_ITERS:-2000}" --lr "$LR" --min-lr "$MIN_LR" \
  --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS:-100}" \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 "${PRECISION[@]}" \
  --tensor-model-parallel-size "$TP" --deepspeed-config examples/ds_zero1.json \
  --data-path "$DATA_PATH" --split "${SPLIT:-998,2,0}" --eval-interval 200 --eval-iters 10 \
  --load "$LOAD" --save "$OUT/checkpoints" --save-interval 200 --keep-last 2 \
  --tensorboard-dir "$OUT/tensorboard" --log-interval 10 ${EXTRA_ARGS:-}
