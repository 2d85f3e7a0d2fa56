#!/usr/bin/env bash
# Make sure Slurm (slurmctld, slurmd, client commands) and MUNGE are installed; tests/test_slurm.py
# calls this. Installs the Debian/Ubuntu packages only when a binary is missing (apt-get as root,
# or through passwordless sudo). Exit 0: ready; exit 1: cannot install (the reason on stderr).
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch srun scontrol squeue scancel munged munge; do
  command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
[ "${#need[@]}" -eq 0 ] && { echo "slurm: already installed"; exit 0; }
echo "slurm: missing ${need[*]}; installing slurmctld slurmd slurm-client munge" >&2
if [ "$(id -u)" = 0 ]; then SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n)
else echo "cannot install Slurm: not root and no passwordless sudo" >&2; exit 1; fi
command -v apt-get >/dev/null 2>&1 || { echo "cannot install Slurm: no apt-get on this machine" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >&2 || { echo "cannot install Slurm: apt-get update failed (no network?)" >&2; exit 1; }
"${SUDO[@]}" apt-get install -y -qq slurmctld slurmd slurm-client munge >&2 \
  || { echo "cannot install Slurm: apt-get install slurmctld slurmd slurm-client munge failed" >&2; exit 1; }
echo "slurm: installed"
