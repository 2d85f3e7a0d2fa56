#!/usr/bin/env bash
# On a GPU node: offline install from wheelhouse/ (tools/build_wheelhouse.py), then the GPU runs.
#   bash tools/gpu_validation.sh training|parallel|kernels  [OUT dir, default results/]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${2:-$ROOT/results}"
mkdir -p "$OUT"
cd "$ROOT"
if ! python3 -c "import megatron.core, deepspeed" 2>/dev/null; then
  bash wheelhouse/install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  training) python3 tools/bench_training.py --iters "${ITERS:-7}" --warmup 2 --json "$OUT/training.json" ;;
  parallel) python3 tools/bench_parallel_gpu.py --out "$OUT" ;;
  kernels)  python3 tools/bench_attention.py ;;
  *) echo "usage: $0 training|parallel|kernels [OUT]"; exit 2 ;;
esac
