# Shared by slurm/pretrain.sbatch, slurm/launch.sh and examples/launch_{torchrun,deepspeed}.sh:
# find the repository and its Python, read a training config, set the distributed environment.
# Sourced, never run. Everything a user can set is an environment variable (slurm/README.md).

ssa_die() { echo "error: $*" >&2; exit 2; }

# SSA_ROOT: the repository (holds slurm/launch.sh). Inside a Slurm job the script itself runs from a
# spool copy, so the submission directory is the fallback.
ssa_find_root() {
  local guess
  for guess in "${SSA_ROOT:-}" "${1:-}" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
    if [ -n "$guess" ] && [ -f "$guess/slurm/launch.sh" ]; then
      SSA_ROOT="$(cd "$guess" && pwd)"; export SSA_ROOT; return 0
    fi
  done
  ssa_die "cannot find the ssa_megatron repository: submit from its root or set SSA_ROOT=/path/to/repo"
}

# SSA_PYTHON: the interpreter with ssa_megatron installed (default: the repo's .venv, else python3).
ssa_find_python() {
  if [ -z "${SSA_PYTHON:-}" ]; then
    if [ -x "$SSA_ROOT/.venv/bin/python" ]; then SSA_PYTHON="$SSA_ROOT/.venv/bin/python"
    else SSA_PYTHON="$(command -v python3 || true)"; fi
  fi
  [ -n "$SSA_PYTHON" ] && [ -x "$SSA_PYTHON" ] || ssa_die "no Python found: set SSA_PYTHON=/path/to/python"
  export SSA_PYTHON
}

# ssa_load_config [CONFIG]: source CONFIG (bash; sets the array TRAIN_ARGS and optionally RUN_NAME,
# RUN_DIR), append $SSA_EXTRA_ARGS (shell words, later flags win), then fix where the run writes:
#   RUN_DIR/checkpoints  --save and --load (a restart or a requeued job resumes from `latest`);
#                        INIT_FROM=DIR: --load DIR while RUN_DIR/checkpoints holds no checkpoint yet
#                        (a converted model's weights start the run)
#   RUN_DIR/tensorboard  --tensorboard-dir (unless the config sets one)
# Result: the array SSA_ARGS (flags for python -m ssa_megatron.training.pretrain) and CKPT_DIR, TB_DIR.
ssa_load_config() {
  local config="${1:-}"
  TRAIN_ARGS=()
  if [ -n "$config" ]; then
    case "$config" in /*) ;; *) [ -f "$config" ] || config="$SSA_ROOT/$config" ;; esac
    [ -f "$config" ] || ssa_die "config file ${1} not found (give a path like slurm/configs/ssa_1b.sh)"
    # shellcheck disable=SC1090
    source "$config"
    SSA_CONFIG_FILE="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  fi
  if [ -n "${SSA_EXTRA_ARGS:-}" ]; then
    local extra
    read -r -a extra <<< "$SSA_EXTRA_ARGS"
    TRAIN_ARGS+=("${extra[@]}")
  fi
  [ "${#TRAIN_ARGS[@]}" -gt 0 ] || ssa_die "no training flags: pass a config file (slurm/configs/*.sh) or set SSA_EXTRA_ARGS"
  local a has_tb=0
  for a in "${TRAIN_ARGS[@]}"; do
    case "$a" in
      --save|--save=*|--load|--load=*)
        ssa_die "the config sets $a, but the launcher owns --save/--load (RUN_DIR/checkpoints, so a requeued job resumes); set RUN_DIR or RUN_NAME instead, and INIT_FROM=DIR to start from a converted model's weights" ;;
      --tensorboard-dir|--tensorboard-dir=*) has_tb=1 ;;
    esac
  done
  RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-ssa-pretrain}}"
  RUN_DIR="${RUN_DIR:-$SSA_ROOT/runs/$RUN_NAME}"
  case "$RUN_DIR" in /*) ;; *) RUN_DIR="$PWD/$RUN_DIR" ;; esac
  CKPT_DIR="$RUN_DIR/checkpoints"
  TB_DIR="$RUN_DIR/tensorboard"
  mkdir -p "$CKPT_DIR"
  local load="$CKPT_DIR"
  local own=0 tag
  for tag in "$CKPT_DIR"/latest "$CKPT_DIR"/iter_[0-9]*; do  # iter_N without latest: a cut-off save
    case "$tag" in *.partial) ;; *) [ -e "$tag" ] && own=1 ;; esac
  done
  if [ -n "${INIT_FROM:-}" ] && [ "$own" = 0 ]; then  # a first attempt: the given weights
    case "$INIT_FROM" in /*) load="$INIT_FROM" ;; *) load="$PWD/$INIT_FROM" ;; esac
    [ -f "$load/latest" ] || ssa_die "INIT_FROM=$INIT_FROM holds no checkpoint (no 'latest' file): give the directory tools/convert_checkpoint.py from-hf (or relayout) wrote"
  fi
  SSA_ARGS=("${TRAIN_ARGS[@]}" --save "$CKPT_DIR" --load "$load")
  if [ "$has_tb" = 0 ]; then SSA_ARGS+=(--tensorboard-dir "$TB_DIR"); else TB_DIR="(set in the config)"; fi
  export RUN_NAME RUN_DIR
}

# The single-node rendezvous port: MASTER_PORT when set and free on this machine, else a free one.
# A port already taken (a shell that kept MASTER_PORT from an earlier job) ends in one line.
ssa_local_port() {
  "$SSA_PYTHON" - "${MASTER_PORT:-}" <<'PY' || exit 2
import socket, sys
want = sys.argv[1]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torchrun's store: a just-closed port is free
try:
    s.bind(("127.0.0.1", int(want) if want else 0))
except (OSError, ValueError, OverflowError):
    sys.exit(f"error: MASTER_PORT={want} is taken (or not a port) on this machine; "
             "unset MASTER_PORT to use a free port, or set a free one")
print(s.getsockname()[1])
PY
}

# Communication defaults HPC users expect; each one only if the user has not set it.
#   SSA_DEVICE=cpu  hide GPUs: gloo on CPU processes (tests, CPU-only partitions)
ssa_comm_env() {
  if [ "${SSA_DEVICE:-gpu}" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=""
  else
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # a rank that dies makes the others fail fast instead of hanging until the time limit
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # InfiniBand: retry timeout 2^22 * 4.096 us (default 18 is short on busy fabrics)
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    # megatron-core orders TP communication and compute on one CUDA work queue
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # NCCL_SOCKET_IFNAME / NCCL_IB_HCA / NCCL_NET_GDR_LEVEL etc. pass through untouched when set.
  fi
  # gloo (CPU, and DeepSpeed's CPU side) picks its interface like NCCL when asked
  case "${NCCL_SOCKET_IFNAME:-^}" in ^*|=*) ;; *)  # gloo knows no ^exclude / =exact syntax
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME%%,*}}" ;;
  esac
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  export PYTHONUNBUFFERED=1
}
