# SSA ~125M: 12 layers, hidden 768, 12 heads / 4 kv groups (head dim 64), FFN 2048 SwiGLU,
# seq 4096 (top-16 blocks of 16 = 6% of the context), lr 1.5e-3 cosine, bf16, ZeRO-1; SSA with
# the project's recipe (per-sequence branch draw, p 0.5, sub4 block score: the trainer's defaults;
# SSA_BRANCH_DRAW=micro-batch SSA_SELECTION_SCORE=mean for SSA as published).
# Same format as ssa_1b.sh (sourced by slurm/pretrain.sbatch and examples/launch_*.sh).
RUN_NAME="${RUN_NAME:-ssa-125m}"
TRAIN_ARGS=(
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 2048
  --num-attention-heads 12 --num-query-groups 4 --seq-length 4096
  --attention-mode "${ATTENTION_MODE:-ssa}" --ssa-block-size 16 --ssa-block-counts 16 --ssa-align-coef 10
  --ssa-branch-draw "${SSA_BRANCH_DRAW:-sequence}" --ssa-full-prob "${SSA_FULL_PROB:-0.5}"
  ${SSA_SELECTION_SCORE:+--ssa-selection-score "$SSA_SELECTION_SCORE"}
  --micro-batch-size "${MICRO_BATCH:-8}" --global-batch-size "${GLOBAL_BATCH:-128}"
  --train-iters "${TRAIN_ITERS:-20000}"
  --lr 1.5e-3 --min-lr 1.5e-4 --lr-decay-style cosine --lr-warmup-fraction 0.01
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
  --data-path ${DATA_PATH:?set DATA_PATH to the .bin/.idx prefix (or a blend: \"0.7 A 0.3 B\")}
  --split 998,2,0 --num-workers 2
  --tensor-model-parallel-size "${TP:-1}"
  --deepspeed-config "$SSA_ROOT/examples/ds_zero1.json"
  --save-interval "${SAVE_INTERVAL:-1000}" --keep-last "${KEEP_LAST:-3}"
  --log-interval 10 --eval-interval 1000 --eval-iters 20 --seed "${SEED:-1234}"
)
