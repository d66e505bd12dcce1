#!/bin/bash
# Build sbx-exec, the runtime's exec stub (sandboxd/runtime/stub/sbx-exec.c), next to its source.
# Static: it runs inside the sandbox's new root, which need not have a dynamic loader or libc.
# Called by scripts/setup.sh; the launcher refuses to start without it.
set -euo pipefail
cd "$(dirname "$0")/.."
src=sandboxd/runtime/stub/sbx-exec.c
out=sandboxd/runtime/stub/sbx-exec
if [ "$out" -nt "$src" ] && [ "${1:-}" != "--force" ]; then
  exit 0
fi
gcc -static -O2 -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong -o "$out.tmp" "$src"
chmod 0755 "$out.tmp"
mv -f "$out.tmp" "$out"
