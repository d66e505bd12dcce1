"""Shared fixtures, and the CI rule: nothing this machine (or the VM tier) can run may skip.

A test that cannot run here says why with `pytest.skip("host lacks: <feature> ...")`. In CI
(CI=true) a skip is a failure unless <feature> is one the VM tier proves instead (see
VM_COVERED); anything else skipping means a broken setup, and the run must not look green.
"""

from __future__ import annotations

import os
import sys

import pytest

# The API tests import grpc into this process; with gRPC's fork support on, every os.fork() of a
# later test (cgroup tests fork children into small pids limits) runs gRPC's fork handlers, which
# start threads in the child and can hang it there. The daemon itself never forks.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Features this host kernel lacks by design and that tests/vm runs for real in the VM.
VM_COVERED = ("apparmor", "cgroup v2", "cgroup2")

_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # An xfail (a documented, still-open weakness whose test runs and fails as expected) is
    # reported as "skipped" by pytest, but it ran: only real skips count.
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def _allowed(reason: str) -> bool:
    r = reason.lower()
    return "host lacks:" in r and any(f in r.split("host lacks:", 1)[1] for f in VM_COVERED)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() != "true":
        return
    bad = [(n, r) for n, r in _skips if not _allowed(r)]
    if bad:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("")
            tr.write_line(f"CI forbids these {len(bad)} skips (this machine supports them):", red=True)
            for n, r in bad:
                tr.write_line(f"  {n}: {r}", red=True)
        session.exitstatus = 1
    if exitstatus == 5:   # no tests collected is a failure, never a quiet success
        session.exitstatus = 1


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: run the suite as root (CI does)")


@pytest.fixture(scope="session")
def runtime():
    """One launcher for the whole session, as the daemon has."""
    need_root()
    from sandboxd.runtime.client import Runtime
    from sandboxd.runtime.config import RuntimeConfig
    # An instance of its own: a launcher removes its instance's leftovers at start, so two
    # sessions sharing one would take each other's runs for a crashed predecessor's.
    rt = Runtime(RuntimeConfig(instance=f"test{os.getpid()}"))
    yield rt
    rt.close()
