#!/usr/bin/env bash
# Sets up the VM test tier (tests/vm, docs/vm-tier.md): QEMU, what virtme-ng needs to boot a
# guest and talk to it, and Debian's stock kernel (linux-image-amd64: AppArmor on, every cgroup
# v2 controller) unpacked into .cache/vm-kernel/. The kernel is never installed into this
# machine's /boot: the VM boots it straight from the cache.
# Idempotent (a second run only checks); called by scripts/setup.sh --test. Run as root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
t0=$(date +%s)

# qemu-system-x86  the emulator. The tier runs it without KVM (--disable-kvm): KVM hangs at boot
#                  on this kind of machine, and plain emulation needs nothing from the host.
# busybox-static   virtme-ng builds the guest's initramfs from it.
# kmod             depmod for the unpacked modules; modprobe, which virtme-ng uses to find the
#                  virtio/9p modules the initramfs must load (Debian builds them as modules).
# udev             creates /dev/virtio-ports/* in the guest: virtme-ng's stdout, stderr and
#                  exit-code channels. Without it output only reaches the serial console and
#                  the exit code is lost.
# file             virtme-ng reads the kernel's version from the image with it.
# apparmor         apparmor_parser, run inside the guest (the guest sees this machine's files).
pkgs=(qemu-system-x86 busybox-static kmod udev file apparmor)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "setup-vm: need root to apt-get install: ${missing[*]}" >&2; exit 1; fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The kernel: linux-image-amd64 is a metapackage; the image package it depends on carries
# vmlinuz and its modules (Debian 12 does not split them).
kdir=.cache/vm-kernel
candidate() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(candidate)
if [ -z "$pkg" ]; then
  apt-get update -q
  pkg=$(candidate)
fi
if [ -z "$pkg" ]; then
  echo "setup-vm: apt knows no linux-image-amd64 package (check /etc/apt/sources.list)" >&2
  exit 1
fi
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
want="$pkg=$ver"
if [ "$(cat "$kdir/.package" 2>/dev/null)" != "$want" ] || ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  echo "setup-vm: fetching $want into $kdir"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  # As root apt-get download warns that its _apt user cannot write here; run it as root.
  # A stale package list can name a version the mirror no longer has: update once and retry.
  (cd "$dl" && { apt-get download -q -o APT::Sandbox::User=root "$want" ||
                 { apt-get update -q && apt-get download -q -o APT::Sandbox::User=root "$want"; }; })
  rm -rf "$kdir.new"
  mkdir -p "$kdir.new"
  dpkg -x "$dl"/*.deb "$kdir.new"
  kver=$(ls "$kdir.new/lib/modules")
  # The package's postinst would run depmod; virtme-ng's module lookup needs modules.dep.
  depmod -a -b "$kdir.new" "$kver"
  echo "$want" > "$kdir.new/.package"
  rm -rf "$kdir"
  mv "$kdir.new" "$kdir"
fi
echo "setup-vm: ok ($(cat "$kdir/.package"), $(( $(date +%s) - t0 )) s)"
