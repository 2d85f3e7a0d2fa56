#!/usr/bin/env bash
# Install what the tests need (tools/setup_env.sh), then run the whole suite on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/tools/setup_env.sh" | tail -n 1)"
cd "$ROOT"
# pytest exits 5 when it collected no test: that is a failure here too.
"$VENV/bin/python" -m pytest -q tests "$@"
