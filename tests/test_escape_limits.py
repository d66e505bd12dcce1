"""Attacker's view of limits and verdicts: exhaust the host, outrun a limit, or make the verdict
lie. Real workloads that write, allocate, stop themselves and get cancelled."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import threading
import time

import pytest

from sandboxd import planner
from sandboxd.errors import SandboxError
from sandboxd.plan import Limits, Status
from tests.sandbox_helpers import PY, plan, py, sh, private_runtime  # noqa: F401

from .conftest import need_root


# --- filesystems: every byte lands in a capped tmpfs that is charged to the run -----------------
@pytest.mark.parametrize("target,cap", [("/dev/shm", 16 << 20), ("/tmp", 64 << 20), ("/box", 64 << 20)])
def test_tmpfs_writes_stop_at_their_cap(runtime, target, cap):
    r = runtime.run(sh(f"dd if=/dev/zero of={target}/big bs=1M count=200 2>&1; echo rc=$?; "
                       f"du -k {target}/big", memory_bytes=512 << 20, file_size_bytes=1 << 30))
    out = r.stdout.decode()
    assert r.status == Status.OK, (r.status, out)
    assert "No space left on device" in out and "rc=1" in out, out
    assert int(out.split()[-2]) * 1024 <= cap, out


def test_tmpfs_bytes_are_charged_to_the_memory_limit(runtime):
    """/box allows 64 MiB, the run 32 MiB of memory: the tmpfs pages count against the run, so
    the file cannot pass the memory limit (host memory stays bounded by the plan)."""
    r = runtime.run(sh("dd if=/dev/zero of=/box/big bs=1M count=60 2>&1; echo rc=$?",
                       memory_bytes=32 << 20))
    assert r.peak_memory_bytes <= (32 << 20) + (1 << 20), r.peak_memory_bytes
    assert r.status in (Status.MEMORY_LIMIT, Status.OK), (r.status, r.stdout)
    if r.status == Status.OK:
        assert b"rc=1" in r.stdout, r.stdout


def test_many_small_files_are_charged_to_the_run(runtime):
    code = ("import os\nfor i in range(1_000_000):\n"
            "    os.close(os.open('/tmp/%07d-%s' % (i, 'x' * 100), os.O_CREAT | os.O_WRONLY, 0o644))\n"
            "print('made them all')")
    r = runtime.run(py(code, memory_bytes=32 << 20, wall_time_ms=60_000, cpu_time_ms=60_000))
    assert r.status == Status.MEMORY_LIMIT and r.oom_kills >= 1, (r.status, r.stdout, r.stderr)
    assert b"made them all" not in r.stdout


# --- output -----------------------------------------------------------------------------------
def test_stderr_flood_stops_at_its_cap(runtime):
    r = runtime.run(sh("echo out; yes err >&2", stderr_bytes=1 << 16, wall_time_ms=5000))
    assert r.status == Status.OUTPUT_LIMIT and r.stderr_truncated and not r.stdout_truncated
    assert len(r.stderr) == 1 << 16 and r.stdout == b"out\n"


def test_output_cap_is_exact_with_many_writers(runtime):
    r = runtime.run(sh("for i in 1 2 3 4 5 6; do yes $i & done; wait", stdout_bytes=300_001,
                       wall_time_ms=5000))
    assert r.status == Status.OUTPUT_LIMIT and len(r.stdout) == 300_001


def test_fake_protocol_frames_in_output_are_just_bytes(runtime):
    fake = b'Z{"status":"OK","exit_code":0}\nP{"kill_reason":null}\nE{}\n'
    r = runtime.run(py(f"import sys, os; os.write(1, {fake!r}); os.write(2, {fake!r}); sys.exit(3)"))
    assert r.status == Status.RUNTIME_ERROR and r.exit_code == 3
    assert r.stdout == fake and r.stderr == fake


# --- runs that try to hang --------------------------------------------------------------------
def test_closing_stdio_and_spinning_hits_the_wall(runtime):
    t0 = time.monotonic()
    r = runtime.run(sh("exec >&- 2>&- <&-; while :; do :; done", wall_time_ms=800, cpu_time_ms=None))
    assert r.status == Status.WALL_TIME_LIMIT and r.killed_by_sandbox
    assert time.monotonic() - t0 < 5


def test_stdin_that_never_ends_hits_the_wall(runtime):
    rfd, wfd = os.pipe()
    try:
        t0 = time.monotonic()
        r = runtime.run(plan(["/bin/cat"], wall_time_ms=800), stdin=rfd)
        assert r.status == Status.WALL_TIME_LIMIT
        assert time.monotonic() - t0 < 5
    finally:
        os.close(rfd)
        os.close(wfd)


@pytest.mark.parametrize("cmd", ["kill -STOP $$", "kill -STOP -1; sleep 5", "kill -TSTP $$; kill -STOP $$"])
def test_stopped_workload_hits_the_wall(runtime, cmd):
    t0 = time.monotonic()
    r = runtime.run(sh(cmd, wall_time_ms=800))
    assert r.status == Status.WALL_TIME_LIMIT, (r.status, r.stderr)
    assert time.monotonic() - t0 < 5


def test_threads_count_toward_cpu(runtime):
    code = ("import threading, time\n"
            "def spin():\n    t = time.monotonic()\n    while time.monotonic() - t < 10: pass\n"
            "ts = [threading.Thread(target=spin) for _ in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]")
    t0 = time.monotonic()
    r = runtime.run(py(code, cpu_time_ms=600, wall_time_ms=20_000))
    assert r.status == Status.TIME_LIMIT and r.killed_by_sandbox
    assert time.monotonic() - t0 < 6


# --- verdicts the workload chooses ------------------------------------------------------------
def test_self_sent_limit_signals_do_not_forge_limit_verdicts(runtime):
    r = runtime.run(sh("kill -XCPU $$", cpu_time_ms=5000))
    assert r.cpu_time_ms < 1000
    assert r.status == Status.SIGNALED, (r.status, r.signal, r.cpu_time_ms)


# --- cancellation -----------------------------------------------------------------------------
def test_cancel_at_any_moment_is_cancelled_or_done(runtime):
    """Cancel raced against set-up, exec, output and exit: never a sandbox error, never a hang."""
    rnd = random.Random(7)
    seen = set()
    for i in range(16):
        ev = threading.Event()
        delay = rnd.choice([0.0, 0.01, 0.03, 0.06, 0.1, 0.2])
        timer = threading.Timer(delay, ev.set)
        timer.start()
        t0 = time.monotonic()
        try:
            r = runtime.run(sh("yes | head -c 100000; sleep 0.05; exit 0"), cancel=ev)
        except SandboxError as e:
            # set-up reached before exec is covered by the xfail below
            assert "setup ended without a report" in str(e), e
            seen.add("setup")
            continue
        finally:
            timer.cancel()
        assert r.status in (Status.CANCELLED, Status.OK), r.status
        assert time.monotonic() - t0 < 5
        seen.add(r.status)
    assert Status.CANCELLED in seen


def test_cancel_before_exec_is_a_cancelled_result():
    with private_runtime("cancel", prefork=0) as rt:       # no spares: set-up outlasts the client's 50 ms
        errors = []
        for _ in range(12):
            ev = threading.Event()
            ev.set()
            try:
                r = rt.run(plan(["/bin/sleep", "5"]), cancel=ev)
                assert r.status == Status.CANCELLED, r.status
            except SandboxError as e:
                errors.append(str(e))
        assert not errors, errors
