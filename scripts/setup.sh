#!/usr/bin/env bash
# Sets up sandboxd on a fresh Debian 12 machine: the apt packages it needs, a venv at .venv
# built on Debian's own python3 (so python3-libapparmor imports), and the package itself.
# Idempotent: safe to run again. Run as root (apt-get); the service itself may then run rootless.
#   --test   also install what the test suite and the VM tier need (qemu, kernel package, virtme-ng).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
want_test=0
for a in "$@"; do [ "$a" = "--test" ] && want_test=1; done

apt_pkgs=(python3 python3-venv python3-dev libseccomp2 uidmap iproute2 nftables
          apparmor python3-libapparmor bubblewrap gcc g++ libc6-dev)
if [ "$want_test" = 1 ]; then
  apt_pkgs+=(qemu-system-x86 busybox-static)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "setup: need root to apt-get install: ${missing[*]}" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's interpreter, never a pyenv shim: the launcher starts once per daemon and its start
# time is on the CLI's path.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_test" = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
# Byte-compile now: the launcher is started per daemon and per CLI call, and environments that set
# PYTHONDONTWRITEBYTECODE would otherwise compile every module at every start.
.venv/bin/python -m compileall -q sandboxd >/dev/null
# The runtime's exec stub (static C; gcc and libc6-dev come with the packages above).
scripts/build_stub.sh
if [ "$want_test" = 1 ] && [ -x scripts/setup-vm.sh ]; then
  scripts/setup-vm.sh
fi
echo "setup: ok ($(.venv/bin/python --version))"
