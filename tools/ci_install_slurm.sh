#!/usr/bin/env bash
# Make sure Slurm (slurmctld, slurmd, client commands) and MUNGE are installed: tests/test_slurm.py
# starts a real one-node cluster with them. Installs the Debian/Ubuntu packages slurmctld, slurmd,
# slurm-client and munge system-wide (apt-get, about 40 packages with dependencies) only when a
# binary is missing, as root or through passwordless sudo. SSA_INSTALL_SLURM=0: never install.
# Exit 0: ready; exit 1: cannot or may not install (the reason on stderr).
#   bash tools/ci_install_slurm.sh [--announce]   (--announce: say so also when nothing is needed)
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0
fi
need=()
for bin in slurmctld slurmd sbatch srun scontrol squeue scancel munged munge; do
  command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
  [ "${1:-}" = "--announce" ] && echo "slurm: already installed (for tests/test_slurm.py)" >&2
  exit 0
fi
[ "${SSA_INSTALL_SLURM:-1}" = 0 ] && { echo "not installing Slurm (SSA_INSTALL_SLURM=0); missing ${need[*]}" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n)
else echo "cannot install Slurm: not root and no passwordless sudo" >&2; exit 1; fi
command -v apt-get >/dev/null 2>&1 || { echo "cannot install Slurm: no apt-get on this machine" >&2; exit 1; }
echo "slurm: tests/test_slurm.py needs ${need[*]}: installing the Debian packages slurmctld slurmd slurm-client munge system-wide with apt-get (about 40 packages with dependencies, 1-2 minutes; SSA_INSTALL_SLURM=0 skips this and those tests)" >&2
export DEBIAN_FRONTEND=noninteractive
start=$SECONDS
log="$(mktemp)"  # apt's and dpkg's lines, shown only when something fails
trap 'rm -f "$log"' EXIT
"${SUDO[@]}" apt-get update -qq > "$log" 2>&1 \
  || { tail -20 "$log" >&2; echo "cannot install Slurm: apt-get update failed (no network?)" >&2; exit 1; }
"${SUDO[@]}" apt-get install -y -qq slurmctld slurmd slurm-client munge > "$log" 2>&1 \
  || { tail -20 "$log" >&2; echo "cannot install Slurm: apt-get install slurmctld slurmd slurm-client munge failed" >&2; exit 1; }
echo "slurm: installed in $((SECONDS - start)) s" >&2
