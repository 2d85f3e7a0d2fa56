#!/usr/bin/env bash
# Session 23, one call when little device time is left (carry wheelhouse_lean, which holds
# fla-core 0.6.0): the target tables with the selection's new defaults (bench_attention:
# bf16 checks, SDPA and fla-core's NSA kernel in the same run), the 1B training step (full, the
# sub4 recipe, the mean score; same run), then the sub4 decode step if time is left.
set -uo pipefail
export PYTHONPATH="$PWD"
t0=$(date +%s)
BUDGET=${BUDGET:-565}  # seconds this call may run (less when little device time is left)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
python3 -c "import megatron.core, deepspeed" 2>/dev/null || bash wheelhouse_lean/install.sh > "$OUT/install.log" 2>&1
python3 -c "import fla" 2>/dev/null || python3 -m pip install --no-index --no-deps wheelhouse_lean/fla_core-*.whl >> "$OUT/install.log" 2>&1
echo "install $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout $(( $(left) > 400 ? 260 : 210 )) python3 tools/bench_attention.py --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
echo "bench_attention rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL" "$OUT/kernels.txt" | tail -3; sed -n '/===/,$p' "$OUT/kernels.txt" | head -60
timeout $(( $(left) - 70 )) python3 tools/bench_training.py --iters 7 --warmup 2 \
  --variants full ssa ssa-mean --json "$OUT/training.json" > "$OUT/training.txt" 2>&1
echo "training rc $? at $(( $(date +%s) - t0 )) s"; tail -6 "$OUT/training.txt"
if [ "$(left)" -gt 45 ]; then
  timeout $(left) python3 tools/bench_decode.py --context 32768 --heads 32/8/128,32/2/64 \
    --selection-score sub4 --cuda-graph --rep 20 --json "$OUT/decode_sub4.json" > "$OUT/decode_sub4.txt" 2>&1
  echo "decode rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL|step" "$OUT/decode_sub4.txt" | tail -6
fi
