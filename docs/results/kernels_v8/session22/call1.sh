#!/usr/bin/env bash
# Session 22, GPU call 1 (run from the repository root with OUT set): the selection with fp16
# scoring operands, int32 merge keys and wider subN merge steps beside the TF32 default, bf16 checks first, then
# the sub4 decode kernels. Each step has its own time limit so that the others still report.
set -uo pipefail
export PYTHONPATH="$PWD"
t0=$(date +%s)
python3 -c "import transformers, triton; print(transformers.__version__, triton.__version__)"
echo "install $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 tools/bench_attention.py --check-only --json "$OUT/check_bf16.json" > "$OUT/check_bf16.txt" 2>&1
echo "check rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL" "$OUT/check_bf16.txt" | tail -3
SEL="default;f16:operands=fp16;f16bn64:operands=fp16,bn=64;f16r96:operands=fp16,maxnreg_large_d=96"
SEL="$SEL;sub4:score=sub4;sub4f:score=sub4,operands=fp16;sub4f64:score=sub4,operands=fp16,bn_sub=64"
SEL="$SEL;k32:keys=int32;f16k32:operands=fp16,keys=int32"
SEL="$SEL;sub4f64k32:score=sub4,operands=fp16,bn_sub=64,keys=int32;f16t32:operands=fp16,rows=128,warps=8,tokens_max=32"
timeout 330 python3 tools/bench_kernel_variants.py --heads 32/8/128,32/2/64 \
  --shapes 4x8192,1x32768 --select "$SEL" --attn default --json "$OUT/select_fp16.json" \
  > "$OUT/select_fp16.txt" 2>&1
echo "variants rc $? at $(( $(date +%s) - t0 )) s"; grep -E "PASS|FAIL|===|select|SDPA" "$OUT/select_fp16.txt" | tail -60
timeout $(( 570 - ($(date +%s) - t0) )) python3 tools/bench_decode.py --context 32768 --heads 32/2/64,32/8/128 \
  --selection-score sub4 --cuda-graph --rep 30 --check-generation --json "$OUT/decode_sub4.json" \
  > "$OUT/decode_sub4.txt" 2>&1
echo "decode rc $? at $(( $(date +%s) - t0 )) s"; tail -25 "$OUT/decode_sub4.txt"
