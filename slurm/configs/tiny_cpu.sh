# A tiny SSA model that trains on CPU processes in seconds: the Slurm test (tests/test_slurm.py) and a
# quick check of a new cluster. Data: DATA_PATH, default the README demo corpus
# (python -m ssa_megatron.data.demo_corpus runs/demo/data --vocab-size 4000).
# Format: see slurm/configs/ssa_1b.sh.
RUN_NAME="${RUN_NAME:-tiny-cpu}"
TRAIN_ARGS=(
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 128
  --num-attention-heads 8 --num-query-groups 2 --seq-length 64
  --attention-mode ssa --ssa-block-size 16 --ssa-block-counts 2
  --micro-batch-size 2 --global-batch-size 4 --train-iters "${TRAIN_ITERS:-40}"
  --lr 1e-3 --lr-warmup-iters 2 --seed "${SEED:-1234}"
  --data-path ${DATA_PATH:-$SSA_ROOT/runs/demo/data/sotu_text_document} --split 100,0,0 --num-workers 0
  --deepspeed-config "$SSA_ROOT/examples/ds_zero1.json"
  --save-interval "${SAVE_INTERVAL:-1000}" --log-interval 1
)
