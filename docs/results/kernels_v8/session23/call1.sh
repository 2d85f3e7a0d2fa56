#!/usr/bin/env bash
# Session 23, GPU call 1 (run from the repository root with OUT set): the selection's new
# defaults (fp16 scoring operands, int32 merge keys, the full pass-2 step at D 128) beside the
# v7 arithmetic and the subN step widths; the sub4 decode step with pieces of split means
# (not split blocks). The target tables follow in call2.sh (fla-core installed there).
set -uo pipefail
export PYTHONPATH="$PWD"
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SEL="default;v7:operands=fp32,keys=int64;f16i64:keys=int64;bn64:bn=64;st64:bn_stats=64;st128:bn_stats=128"
SEL="$SEL;r96:maxnreg_large_d=96;s3:stages=3;sub4:score=sub4;sub4b64:score=sub4,bn_sub=64;sub4b128:score=sub4,bn_sub=128"
timeout 240 python3 tools/bench_kernel_variants.py --heads 32/8/128,32/2/64 \
  --shapes 4x8192,1x32768 --select "$SEL" --attn default --json "$OUT/select_defaults.json" \
  > "$OUT/select_defaults.txt" 2>&1
echo "variants rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL|===|select|SDPA" "$OUT/select_defaults.txt" | tail -34
grep -E "^check" "$OUT/select_defaults.txt" | python3 -c "
import sys, json
for line in sys.stdin:
    r = json.loads(line[6:]); print(r['shape'], {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k.startswith('sel_')})"
timeout 120 python3 tools/bench_decode.py --context 32768 --heads 32/2/64,32/8/128 \
  --selection-score sub4 --cuda-graph --rep 30 --check-generation --json "$OUT/decode_sub4.json" \
  > "$OUT/decode_sub4.txt" 2>&1
echo "decode rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL|step" "$OUT/decode_sub4.txt" | tail -8
