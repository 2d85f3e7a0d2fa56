#!/usr/bin/env bash
# Next GPU call after session 23 (carry wheelhouse_lean, which holds fla-core 0.6.0): issue 21's
# target tables with the selection settings adopted in session 23 and the decode rows (the
# recipe's sub4 score, eager and CUDA-graphed; the select kernel now reads the stats kernel's
# logits), SDPA and fla-core in the same run; the 1B training step (full, sub4, mean); the
# selection's time without its top-k merge (what the merge costs now).
set -uo pipefail
export PYTHONPATH="$PWD"
t0=$(date +%s)
BUDGET=${BUDGET:-565}  # seconds this call may run (less when little device time is left)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
python3 -c "import megatron.core, deepspeed" 2>/dev/null || bash wheelhouse_lean/install.sh > "$OUT/install.log" 2>&1
python3 -c "import fla" 2>/dev/null || python3 -m pip install --no-index --no-deps wheelhouse_lean/fla_core-*.whl >> "$OUT/install.log" 2>&1
echo "install $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python3 tools/bench_attention.py --decode --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
echo "bench_attention rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL" "$OUT/kernels.txt" | tail -3
sed -n '/^ratios/,$p' "$OUT/kernels.txt" | head -30
timeout $(( $(left) - 50 )) python3 tools/bench_training.py --iters 7 --warmup 2 \
  --variants full ssa ssa-mean --json "$OUT/training.json" > "$OUT/training.txt" 2>&1
echo "training rc $? at $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/training.txt"
if [ "$(left)" -gt 30 ]; then
  timeout $(left) python3 tools/bench_kernel_variants.py --heads 32/8/128,32/2/64 --shapes 1x32768 \
    --skip-check --select "default;ablate-nomerge:topk=0;s4:score=sub4;ablate-s4nomerge:score=sub4,topk=0" \
    --attn default --json "$OUT/ablate.json" > "$OUT/ablate.txt" 2>&1
  echo "ablate rc $? at $(( $(date +%s) - t0 )) s"; sed -n '/===/,$p' "$OUT/ablate.txt" | grep select
fi
