# SSA 1B, the paper's shape and optimizer (arXiv 2511.20102): 16 layers, hidden 2048, 32 heads / 2 kv groups,
# seq 8192, AdamW lr 1e-3 cosine, 1% warm-up, bf16, ZeRO-2; SSA with this project's recipe (the
# trainer's defaults, docs/RESULTS.md "SSA quality" and "Session 21"): the branch drawn per
# sequence with full-branch probability 0.5, blocks selected by the sub4 score.
# SSA_BRANCH_DRAW=micro-batch SSA_SELECTION_SCORE=mean for SSA as published.
# For slurm/pretrain.sbatch and examples/launch_*.sh.
#
# Format: a bash file that the launchers `source`. It sets the array TRAIN_ARGS (flags of
# `python -m ssa_megatron.training.pretrain`, as in Megatron-LM) and may set RUN_NAME / RUN_DIR.
# Environment variables are expanded when it is read; ${VAR:-default} keeps a default overridable
# at submission (sbatch passes the submitting shell's environment to the job).
# Do not put --save/--load here: the launcher sets both to RUN_DIR/checkpoints (auto-resume).
RUN_NAME="${RUN_NAME:-ssa-1b}"
TRAIN_ARGS=(
  --num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192
  --num-attention-heads 32 --num-query-groups 2 --seq-length 8192
  --attention-mode ssa --ssa-block-size 16 --ssa-block-counts 16 --ssa-align-coef 10
  --ssa-branch-draw "${SSA_BRANCH_DRAW:-sequence}" --ssa-full-prob "${SSA_FULL_PROB:-0.5}"
  ${SSA_SELECTION_SCORE:+--ssa-selection-score "$SSA_SELECTION_SCORE"}
  --micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:-64}"
  --train-iters "${TRAIN_ITERS:-20000}"
  --lr 1e-3 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.01
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
  --data-path ${DATA_PATH:?set DATA_PATH to the .bin/.idx prefix (or a blend: \"0.7 A 0.3 B\")}
  --split 998,2,0 --num-workers 2
  --tensor-model-parallel-size "${TP:-1}"
  --deepspeed-config "$SSA_ROOT/examples/ds_zero2.json"
  --save-interval "${SAVE_INTERVAL:-500}" --keep-last "${KEEP_LAST:-3}"
  --log-interval 10 --eval-interval 1000 --eval-iters 20 --seed "${SEED:-1234}"
)
