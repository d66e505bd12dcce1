#!/usr/bin/env bash
# Sets up sandboxd on a fresh Debian 12 machine (as root) and starts the service in the
# foreground with the shipped policies, listening on /run/sandboxd/sandboxd.sock.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/setup.sh
exec .venv/bin/sandboxd serve --config config/server.yaml "$@"
