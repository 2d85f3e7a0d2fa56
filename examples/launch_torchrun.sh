#!/usr/bin/env bash
# Single-node launch of the Slurm job (slurm/pretrain.sbatch) with torchrun: same config file, same
# run directory (RUN_DIR/checkpoints is both --save and --load, so running this again resumes).
#
#   bash examples/launch_torchrun.sh slurm/configs/ssa_1b.sh                 # all GPUs of this node
#   NPROC_PER_NODE=2 SSA_DEVICE=cpu bash examples/launch_torchrun.sh slurm/configs/tiny_cpu.sh
#
# NPROC_PER_NODE: processes (default: one per visible GPU); SSA_DEVICE=cpu: gloo on CPU processes;
# MASTER_PORT: rendezvous port (default: a free one). Other settings: slurm/README.md.
set -euo pipefail
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { awk 'NR > 1 && !/^#/ {exit} NR > 1 && !/^#SBATCH/ {sub(/^# ?/, ""); print}' "$0"; exit 0; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/slurm/common.sh"
ssa_find_root "$ROOT"
ssa_find_python
ssa_load_config "${1:-${SSA_CONFIG:-}}"
ssa_comm_env
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$("$SSA_PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi
PORT="$(ssa_local_port)"
echo "torchrun: $NPROC_PER_NODE processes; checkpoints $CKPT_DIR; tensorboard $TB_DIR"
# one node, rendezvous on a free local port; torchrun forwards SIGTERM to the ranks, which save and stop (exit 3)
exec "$SSA_PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr 127.0.0.1 --master-port "$PORT" \
  -m ssa_megatron.training.signals ssa_megatron.training.pretrain "${SSA_ARGS[@]}"
