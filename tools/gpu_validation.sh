#!/usr/bin/env bash
# On a GPU node: offline install from wheelhouse/ (tools/build_wheelhouse.py) when megatron-core or
# DeepSpeed is missing, then the GPU measurements behind docs/RESULTS.md and docs/KERNEL_NOTES.md.
#   bash tools/gpu_validation.sh training|parallel|kernels|variants|select-sweep|floor|mfu|decode|compare|compare-large|compare-small|robust|diagnose|quality [OUT]
# OUT: where the results go (default results/). compare, diagnose and quality need the corpus of
# tools/prepare_english_corpus.sh in runs/english. quality: the SSA quality study (small models,
# many seeds side by side on each GPU; STUDY_GROUPS, JOBS_PER_GPU, DEADLINE, STUDY pick what and how).
# select-sweep and floor take HEADS=HQ/H/D (e.g. 32/8/128, the Llama layout).
# compare-large: six systems (Full-Full, Sparse-Sparse, NSA, SSA as published, the mean-score recipe and the shipped sub4 recipe) on the non-repeating corpus (prepare_english_corpus.sh --large in
# runs/english_large, or SHARDS=dir of tools/corpus_shards.py to join first), 1650 steps x 16 x 4096
# = 108M tokens each seen once; SYSTEMS (started in the order given), SEEDS, DEADLINE, JOBS_PER_GPU,
# COMPARE_OUT (default runs/compare_large), VARIANT='name=trainer flags' (one more system, named
# in SYSTEMS), EVAL_SELECTIONS='oracle recent4' (sparse mode also under those block selections),
# WARMUP=0.06 (warm-up fraction for every system; default 0.02), EVAL_WINDOWS (valid windows of
# 4096 tokens, default 64; each evaluation takes about 4x as long at 256); run again to resume.
# compare-small: the quality issue's small setting in one call (8 layers x 384, 12 q / 4 kv heads,
# seq 4096, 600 steps of 4 x 4096 tokens each seen once, lr 1e-3, 20 warm-up steps, cosine to 0:
# paper_comparison.py --preset small) on a sample of the large corpus (tools/prepare_small_study.sh
# LARGE_DIR SMALL [SHARD_DIR]: SMALL, default runs/english_sample, or SHARDS=dir of its shards to
# join first); SYSTEMS (default full-full ssa-recipe), SEEDS (default 1 2),
# JOBS_PER_GPU (default 4), EVAL_SELECTIONS, DEADLINE (default 330), SMALL_OUT.
# robust: REPLICATES (default 4) runs of the recipe on each of SEEDS (default 1) on the large
# corpus, stopped at STOP_AT (default 150) of the 1650-step schedule, WARMUP as above, attention
# diagnostics every step to 60 then every 10 (diagnostics.jsonl beside each run's train.json):
# how far runs that differ only in GPU summation order spread at the end of the warm-up.
# ROBUST_OUT (default runs/robust_warmupW_stopS) holds one setting; run again to resume.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  training|parallel|kernels|variants|select-sweep|floor|mfu|decode|compare|compare-large|compare-small|robust|diagnose|quality) ;;
  *) usage >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # tools/*.py run this checkout's ssa_megatron
if ! python3 -c "import megatron.core, deepspeed" 2>/dev/null; then
  [ -f wheelhouse/install.sh ] || { echo "error: megatron-core / DeepSpeed are not installed and there is no wheelhouse/: build one with python tools/build_wheelhouse.py --out wheelhouse where there is internet and copy it here" >&2; exit 1; }
  log="$(mktemp)"
  echo "installing from wheelhouse/ (log: $log) ..." >&2
  bash wheelhouse/install.sh > "$log" 2>&1 || { tail -20 "$log" >&2; rm -f "$log"; exit 1; }
  rm -f "$log"
fi
OUT="${2:-$ROOT/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: some modes change directory
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  training) python3 tools/bench_training.py --iters "${ITERS:-7}" --warmup 2 --json "$OUT/training.json" ;;
  parallel) python3 tools/bench_parallel_gpu.py --out "$OUT" ;;
  kernels)  python3 tools/bench_attention.py --select-merge sort,extract --json "$OUT/kernels.json" ;;
  variants) python3 tools/bench_kernel_variants.py --json "$OUT/variants.json" ;;
  select-sweep)  # selection tile shapes at the Llama layout (G 4, D 128), and its scoring floor
    python3 tools/bench_kernel_variants.py --heads "${HEADS:-32/8/128}" --shapes 4x8192,1x32768 \
      --select "default;r32:rows=32;r32w2:rows=32,warps=2;r128w8:rows=128,warps=8;bn16:bn=16;ablate-nomerge:topk=0" \
      --attn default --json "$OUT/select_sweep.json" ;;
  floor)    python3 tools/bench_byte_floor.py ${HEADS:+--heads "$HEADS"} --json "$OUT/floor.json" ;;
  decode)   # one decode step at 32k (HF model, 1B shapes): kernels checked, then timed; B1 and B4
    # (both run even when the first one's checks fail; the mode fails if either did)
    rc=0
    python3 tools/bench_decode.py --context 32768 --heads 32/2/64,32/8/128 --cuda-graph --rep 30 --check-generation \
      --json "$OUT/decode_b1.json" || rc=1
    python3 tools/bench_decode.py --context 32768 --heads 32/8/128 --batch 4 --cuda-graph --rep 30 \
      --json "$OUT/decode_b4.json" || rc=1
    # a moment2 model (the scoring at 2 D) and a model with a learned selection map (its own queries)
    python3 tools/bench_decode.py --context 32768 --heads 32/2/64 --selection-score moment2 \
      --cuda-graph --rep 30 --check-generation --json "$OUT/decode_moment2.json" || rc=1
    python3 tools/bench_decode.py --context 32768 --heads 32/2/64 --select-proj \
      --cuda-graph --rep 30 --json "$OUT/decode_map.json" || rc=1
    # a sub4 model (the cache's 4 sub-block means per block)
    python3 tools/bench_decode.py --context 32768 --heads 32/2/64,32/8/128 --selection-score sub4 \
      --cuda-graph --rep 30 --check-generation --json "$OUT/decode_sub4.json" || rc=1
    exit $rc ;;
  mfu)      # full attention at 1x1 (fused/unfused), with accumulation, and SSA/sparse alongside
    python3 tools/bench_training.py --iters 6 --warmup 2 --variants full \
      --custom "full-unfused=--attention-mode full --no-bias-swiglu-fusion --no-cross-entropy-loss-fusion" \
      "full-gas8=--attention-mode full --global-batch-size 8" "ssa-gas8=--attention-mode ssa --global-batch-size 8" \
      "full-mb2-gas4=--attention-mode full --micro-batch-size 2 --global-batch-size 8" \
      "ssa-mb2-gas4=--attention-mode ssa --micro-batch-size 2 --global-batch-size 8" \
      "sparse-gas8=--attention-mode sparse --global-batch-size 8" --json "$OUT/mfu.json" ;;
  compare)  # the paper's comparison at 100M tokens per model; run again to resume (same machine);
    # SYSTEMS='full-full sparse-sparse' to run some, JOBS_PER_GPU=2 to share GPUs,
    # LR=5e-4 STUDY=compare100_lr5e-4 for the same study at another peak lr
    STUDY="${STUDY:-compare100}"
    python3 tools/paper_comparison.py --data-path runs/english/english_text_document \
      --out "runs/$STUDY" --lr "${LR:-1e-3}" --seeds 1 2 --train-iters 1530 --micro-batch-size 16 \
      --global-batch-size 16 --log-interval 100 --eval-windows 32 --deadline "${DEADLINE:-540}" \
      --systems ${SYSTEMS:-full-full sparse-sparse ssa} --jobs-per-gpu "${JOBS_PER_GPU:-1}" || true
    (cd runs && tar czf "$OUT/$STUDY.tgz" --exclude=checkpoint "$STUDY") ;;
  compare-large)  # the quality issue's comparison at scale, every token seen once
    LARGE="${LARGE:-runs/english_large}"
    COMPARE_OUT="${COMPARE_OUT:-runs/compare_large}"
    if [ ! -f "$LARGE/english_text_document.idx" ]; then
      [ -n "${SHARDS:-}" ] || { echo "error: no $LARGE/english_text_document.idx: build it with tools/prepare_english_corpus.sh --large, or set SHARDS=dir of tools/corpus_shards.py split" >&2; exit 1; }
      python3 tools/corpus_shards.py join "$SHARDS" "$LARGE"
    fi
    python3 tools/paper_comparison.py --data-path "$LARGE/english_text_document" \
      --out "$COMPARE_OUT" --seeds ${SEEDS:-1 2} --train-iters 1650 --micro-batch-size 16 \
      --global-batch-size 16 --log-interval 50 --eval-windows "${EVAL_WINDOWS:-64}" --deadline "${DEADLINE:-540}" \
      --eval-dense-layers 1 ${EVAL_SELECTIONS:+--eval-selections $EVAL_SELECTIONS} \
      ${WARMUP:+--lr-warmup-fraction $WARMUP} \
      --systems ${SYSTEMS:-full-full sparse-sparse nsa ssa ssa-recipe ssa-recipe-sub4} --in-order --jobs-per-gpu "${JOBS_PER_GPU:-1}" \
      ${VARIANT:+--variant "$VARIANT"} || true
    (cd "$(dirname "$COMPARE_OUT")" && tar czf "$OUT/compare_large.tgz" --exclude=checkpoint "$(basename "$COMPARE_OUT")") ;;
  compare-small)  # the small setting, every run side by side on one GPU; run again to resume
    SMALL="${SMALL:-runs/english_sample}"
    SMALL_OUT="${SMALL_OUT:-runs/compare_small}"
    if [ ! -f "$SMALL/english_text_document.idx" ]; then
      [ -n "${SHARDS:-}" ] || { echo "error: no $SMALL/english_text_document.idx: make it with tools/prepare_small_study.sh, or set SHARDS=dir of tools/corpus_shards.py split" >&2; exit 1; }
      python3 tools/corpus_shards.py join "$SHARDS" "$SMALL"
    fi
    python3 tools/paper_comparison.py --data-path "$SMALL/english_text_document" --out "$SMALL_OUT" \
      --preset small --log-interval 10 --eval-windows 32 \
      ${EVAL_SELECTIONS:+--eval-selections $EVAL_SELECTIONS} --systems ${SYSTEMS:-full-full ssa-recipe} \
      --seeds ${SEEDS:-1 2} --jobs-per-gpu "${JOBS_PER_GPU:-4}" --deadline "${DEADLINE:-330}" || true
    (cd "$(dirname "$SMALL_OUT")" && tar czf "$OUT/compare_small.tgz" --exclude=checkpoint "$(basename "$SMALL_OUT")") ;;
  robust)  # replicates to STOP_AT: the spread that the end of the warm-up makes (docs/RESULTS.md)
    LARGE="${LARGE:-runs/english_large}"
    ROBUST_OUT="${ROBUST_OUT:-runs/robust_warmup${WARMUP:-0.02}_stop${STOP_AT:-150}}"
    if [ ! -f "$LARGE/english_text_document.idx" ]; then
      [ -n "${SHARDS:-}" ] || { echo "error: no $LARGE/english_text_document.idx: build it with tools/prepare_english_corpus.sh --large, or set SHARDS=dir of tools/corpus_shards.py split" >&2; exit 1; }
      python3 tools/corpus_shards.py join "$SHARDS" "$LARGE"
    fi
    recipe='--attention-mode ssa --ssa-branch-draw sequence --ssa-full-prob 0.5 --ssa-selection-score mean --diagnostics-interval 10 --diagnostics-dense-until 60'
    names=(); variants=()
    for i in $(seq 1 "${REPLICATES:-4}"); do names+=("rep$i"); variants+=("rep$i=$recipe"); done
    python3 tools/paper_comparison.py --data-path "$LARGE/english_text_document" --out "$ROBUST_OUT" \
      --seeds ${SEEDS:-1} --train-iters 1650 --stop-at "${STOP_AT:-150}" --micro-batch-size 16 \
      --global-batch-size 16 --log-interval 5 --skip-eval --in-order --deadline "${DEADLINE:-540}" \
      --lr-warmup-fraction "${WARMUP:-0.02}" --systems "${names[@]}" --variant "${variants[@]}" \
      || status=$?  # a deadline stop or a refused folder: whatever finished is still packed
    for d in "$ROBUST_OUT"/*/checkpoint/diagnostics.jsonl; do [ -f "$d" ] && cp "$d" "$(dirname "$(dirname "$d")")/"; done
    for seed in ${SEEDS:-1}; do  # each seed's replicates against its first
      specs=(); for name in "${names[@]}"; do specs+=("$name=$ROBUST_OUT/${name}_seed$seed"); done
      python3 tools/replicate_spread.py "${specs[@]}" --json "$ROBUST_OUT/spread_seed$seed.json" \
        | tee "$ROBUST_OUT/spread_seed$seed.md" || true
    done
    (cd "$(dirname "$ROBUST_OUT")" && tar czf "$OUT/robust.tgz" --exclude=checkpoint "$(basename "$ROBUST_OUT")")
    exit "${status:-0}" ;;
  diagnose)  # why SSA trails Full-Full: ablations to step 400 of the 100M schedule (seed 1),
    # Triton-vs-reference gradients on a trained SSA model, then the kernel timings
    python3 tools/paper_comparison.py --data-path runs/english/english_text_document \
      --out runs/diagnose --seeds 1 --train-iters 1530 --stop-at 400 --micro-batch-size 16 \
      --global-batch-size 16 --log-interval 100 --skip-eval --deadline "${DEADLINE:-330}" \
      --systems ssa ssa-alpha0 ssa-always-full ssa-always-sparse full-full sparse-sparse \
      --variant "ssa-alpha0=--attention-mode ssa --ssa-selection-score mean --ssa-branch-draw micro-batch --ssa-full-prob 0.5 --ssa-align-coef 0" \
      "ssa-always-full=--attention-mode ssa --ssa-selection-score mean --ssa-branch-draw micro-batch --ssa-full-prob 1" \
      "ssa-always-sparse=--attention-mode ssa --ssa-selection-score mean --ssa-branch-draw micro-batch --ssa-full-prob 0" || true
    (cd runs && tar czf "$OUT/diagnose.tgz" --exclude=checkpoint diagnose)
    CUDA_VISIBLE_DEVICES=0 python3 tools/check_backend_parity.py --data-path runs/english/english_text_document \
      --checkpoint runs/diagnose/ssa_seed1/checkpoint --json "$OUT/parity.json" > "$OUT/parity.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=$(( $(nvidia-smi -L | wc -l) - 1 )) python3 tools/bench_attention.py \
      --json "$OUT/diagnose_kernels.json" > "$OUT/diagnose_kernels.txt" 2>&1 || true
    wait || true
    tail -12 "$OUT/parity.txt"; tail -30 "$OUT/diagnose_kernels.txt" ;;
  quality)  # SSA quality study: run again on the same machine to continue (finished runs are skipped)
    STUDY="${STUDY:-quality}"
    python3 tools/ssa_quality_study.py run --in-order --data-path runs/english/english_text_document \
      --out "runs/$STUDY" --groups ${STUDY_GROUPS:-full-full:1-4 ssa-seq:1-8 ssa-step:1-8} \
      --gpus "$(nvidia-smi -L | wc -l)" --jobs-per-gpu "${JOBS_PER_GPU:-10}" --deadline "${DEADLINE:-420}" || true
    python3 tools/ssa_quality_study.py summarize --out "runs/$STUDY" --plot "$OUT/$STUDY.png" || true
    (cd runs && tar czf "$OUT/$STUDY.tgz" "$STUDY") ;;
esac
