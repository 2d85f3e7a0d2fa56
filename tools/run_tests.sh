#!/usr/bin/env bash
# The whole test suite on the CPU (what CI runs). Steps, each announced when it starts:
#   1. tools/setup_env.sh: .venv with the tested pins (the first time: 1-3 minutes).
#   2. tools/ci_install_slurm.sh: tests/test_slurm.py starts a real one-node Slurm; when slurmctld,
#      slurmd, the Slurm client or munge are missing and this runs as root (or with passwordless
#      sudo), it installs those Debian packages system-wide with apt-get (about 40 packages with
#      their dependencies). SSA_INSTALL_SLURM=0: install nothing (the Slurm tests are skipped).
#   3. pytest: one line per test file as it runs, then each file's time and the slowest tests.
#      Temporary files go to one directory that is removed at the end.
# Usage: bash tools/run_tests.sh [pytest arguments]   e.g. -k zero, or tests/test_model.py
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/tools/setup_env.sh" | tail -n 1)"
cd "$ROOT"
if [ "${SSA_INSTALL_SLURM:-1}" != 0 ]; then
  bash tools/ci_install_slurm.sh --announce >&2 || true  # on failure the Slurm tests skip, saying why
fi
# DeepSpeed builds its CPU communication op on first use under a file lock. Built here, once per
# virtual environment and before any test: a test that kills a training process (run safety)
# must never interrupt that build. A lock left by a process killed while loading it is removed
# (ssa_megatron/training/build_lock.py), here and at the start of every training run.
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
echo "tests: DeepSpeed's CPU communication op in $TORCH_EXTENSIONS_DIR (built the first time, ~30 s)" >&2
"$VENV/bin/python" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
from ssa_megatron.training.build_lock import abandoned_lock_cleared, deepspeed_cpu_op_build_dir
with abandoned_lock_cleared(deepspeed_cpu_op_build_dir()): ShareMemCommBuilder().load(verbose=False)" \
  >/dev/null 2>&1 || echo "tests: building DeepSpeed's CPU communication op failed; its tests will say why" >&2
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/ssa-tests.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
echo "tests: temporary files in $SCRATCH (removed at the end)" >&2
# pytest exits 5 when it collected no test: that is a failure here too.
TMPDIR="$SCRATCH" PYTHONPATH="$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest \
  -p file_timings --basetemp "$SCRATCH/pytest" --durations 15 "$@"  # pytest.ini: testpaths = tests
