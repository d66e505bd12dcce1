#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian 12 machine (as root) and runs the
# whole suite, VM tier included. In CI (CI=true) a skip of anything this machine or the VM tier
# supports fails the run (tests/conftest.py), and so does a run that collects no tests.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/setup.sh --test
if [ -x scripts/gen_proto.sh ]; then
  scripts/gen_proto.sh --check
fi
set +e
.venv/bin/python -m pytest -ra -q -p no:cacheprovider "$@" tests
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
