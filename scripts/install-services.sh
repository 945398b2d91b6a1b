#!/usr/bin/env bash
# Installs the real services the test suite starts privately (never as system services):
# Slurm (slurm-wlm) with munge. Run by `make services`, which `make test` runs first.
set -euo pipefail
need=()
for prog in slurmctld slurmd sbatch munged; do
  command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || need+=("$prog")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "services: slurm-wlm and munge are installed"
  exit 0
fi
echo "services: missing ${need[*]}: installing Debian's slurm-wlm and munge"
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "services: run as root, or install them yourself: apt-get install slurm-wlm munge" >&2; exit 1; fi
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "services: installed slurm-wlm and munge (nothing was started; the tests start private instances)"
