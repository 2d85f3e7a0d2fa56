#!/usr/bin/env bash
# Session 23, GPU call 2 (carry wheelhouse_lean, which holds fla-core 0.6.0 beside the lean
# wheels): the target tables with the selection's new defaults (bench_attention, SDPA
# and fla-core's NSA kernel in the same run), then the 1B training step: full attention, the
# recipe (sub4) and the mean score, same run.
set -uo pipefail
export PYTHONPATH="$PWD"
t0=$(date +%s)
python3 -c "import megatron.core, deepspeed" 2>/dev/null || bash wheelhouse_lean/install.sh > "$OUT/install.log" 2>&1
python3 -c "import fla" 2>/dev/null || python3 -m pip install --no-index --no-deps wheelhouse_lean/fla_core-*.whl >> "$OUT/install.log" 2>&1
echo "install $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 330 python3 tools/bench_attention.py --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
echo "bench_attention rc $? at $(( $(date +%s) - t0 )) s"; sed -n '/===/,$p' "$OUT/kernels.txt" | head -70
timeout $(( 580 - ($(date +%s) - t0) )) python3 tools/bench_training.py --iters 7 --warmup 2 \
  --variants full ssa ssa-mean --json "$OUT/training.json" > "$OUT/training.txt" 2>&1
echo "training rc $? at $(( $(date +%s) - t0 )) s"; tail -6 "$OUT/training.txt"
