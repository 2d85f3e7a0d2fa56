# Continued SSA pretraining of a converted model (a Hugging Face Llama 2 / 3 / 3.1 / 3.2, Mistral,
# Qwen2, Qwen3 or Phi-3 model imported by tools/convert_checkpoint.py from-hf) at a longer context,
# with the requeue and resume of any Slurm run. Why these settings: examples/README.md,
# "Continued pretraining of an existing model".
#
#   python tools/convert_checkpoint.py from-hf --input /models/Llama-3.2-1B --output ckpt/llama32 \
#     --tensor-model-parallel-size 2
#   python tools/preprocess_data.py --input corpus/ --tokenizer /models/Llama-3.2-1B \
#     --output-prefix data/llama32_text_document          # the model's own tokenizer (and its BOS)
#   INIT_FROM=ckpt/llama32 DATA_PATH=data/llama32_text_document TP=2 RUN_NAME=llama32-ssa \
#     sbatch slurm/pretrain.sbatch slurm/configs/continued.sh
#
# INIT_FROM     the converted checkpoint: its weights start the run (fresh optimizer); once
#               RUN_DIR/checkpoints holds a checkpoint, every later attempt resumes from that
# SEQ_LENGTH    the new context (default: 4 x the model's, at most 32768)
# ROPE          auto | scaling | base | keep, ROPE_BASE_FACTOR (8): tools/convert_checkpoint.py
#               continue-flags --help
# LR (3e-5), MIN_LR (LR / 10), WARMUP_ITERS (100), TRAIN_ITERS (2000), GLOBAL_BATCH (64),
# MICRO_BATCH (1), TP (default: the layout INIT_FROM was converted for), BLOCK_COUNTS (16), SPLIT (998,2,0), SAVE_INTERVAL (200),
# KEEP_LAST (2), SSA_DEVICE=cpu (fp32 on CPU processes, a smoke run), SSA_SELECTION_SCORE (the
# trainer's default: sub4, the recipe's block score; mean selects as the paper does)
RUN_NAME="${RUN_NAME:-continued-$(basename "${INIT_FROM:-model}")}"
# the model flags: INIT_FROM's (its context, RoPE change and TP size) until the run has a
# checkpoint of its own, then that checkpoint's, so requeued attempts no longer need INIT_FROM
OWN_CHECKPOINTS="${RUN_DIR:-$SSA_ROOT/runs/$RUN_NAME}/checkpoints"
CONTINUE_FLAGS="$("$SSA_PYTHON" "$SSA_ROOT/tools/convert_checkpoint.py" continue-flags \
  ${INIT_FROM:+--input "$INIT_FROM"} --resume-from "$OWN_CHECKPOINTS" \
  ${SEQ_LENGTH:+--seq-length "$SEQ_LENGTH"} --rope "${ROPE:-auto}" \
  --rope-base-factor "${ROPE_BASE_FACTOR:-8}")" || ssa_die "no model flags for this run (the line above says why; INIT_FROM: the checkpoint tools/convert_checkpoint.py from-hf wrote)"
read -r -a MODEL_FLAGS <<< "$CONTINUE_FLAGS"
LR="${LR:-3e-5}"
PRECISION=(--bf16 --recompute-activations)
[ "${SSA_DEVICE:-gpu}" = cpu ] && PRECISION=()
TRAIN_ARGS=(
  "${MODEL_FLAGS[@]}"
  --attention-mode ssa --ssa-block-size 16 --ssa-block-counts "${BLOCK_COUNTS:-16}"
  ${SSA_SELECTION_SCORE:+--ssa-selection-score "$SSA_SELECTION_SCORE"}
  --micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:-64}"
  --train-iters "${TRAIN_ITERS:-2000}" --lr "$LR" --min-lr "${MIN_LR:-$("$SSA_PYTHON" -c "print($LR / 10)")}"
  --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS:-100}"
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 "${PRECISION[@]}"
  ${TP:+--tensor-model-parallel-size "$TP"} --deepspeed-config "$SSA_ROOT/examples/ds_zero1.json"
  --data-path ${DATA_PATH:?set DATA_PATH to a .bin/.idx prefix made with the tokenizer of the model}
  --split "${SPLIT:-998,2,0}" --eval-interval 200 --eval-iters 10
  --save-interval "${SAVE_INTERVAL:-200}" --keep-last "${KEEP_LAST:-2}" --log-interval 10
)
