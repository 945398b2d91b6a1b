#!/usr/bin/env bash
# Installs the real services the test suite starts privately (never as system services):
# Slurm (slurm-wlm) with munge, etcd (etcd-server) and Mosquitto. Run by `make services`, which `make test` runs first.
set -euo pipefail
need=()
packages=()
for prog in slurmctld slurmd sbatch munged; do
  command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || need+=("$prog")
done
[ ${#need[@]} -eq 0 ] || packages+=(slurm-wlm munge)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || { need+=(etcd); packages+=(etcd-server); }
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { need+=(mosquitto); packages+=(mosquitto); }
if [ ${#packages[@]} -eq 0 ]; then
  echo "services: slurm-wlm, munge, etcd-server and mosquitto are installed"
  exit 0
fi
echo "services: missing ${need[*]}: installing Debian's ${packages[*]}"
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "services: run as root, or install them yourself: apt-get install ${packages[*]}" >&2; exit 1; fi
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d keeps the packages' own system services from starting: the tests start private instances
$SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "services: installed ${packages[*]} (nothing was started; the tests start private instances)"
