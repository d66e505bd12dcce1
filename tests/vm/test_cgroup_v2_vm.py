"""cgroup v2 for real, through sandboxd.runtime.cgroups: limits that act on real processes and the
counters v2 keeps (memory.events, pids.events, cpu.stat), cgroup.kill, and a rootless sandboxd
in a delegated subtree. This machine's host keeps memory on cgroup v1; the guest is pure v2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sandboxd.errors import LaunchError
from sandboxd.plan import Limits
from sandboxd.runtime.cgroups import CgroupManager
from tests.conftest import ROOT

CG = "/sys/fs/cgroup"
PY = "/usr/bin/python3"
MiB = 1 << 20


def _keyed(path: str) -> dict[str, int]:
    with open(path) as f:
        return {k: int(v) for k, v in (ln.split() for ln in f if ln.strip())}


@pytest.fixture(scope="module")
def mgr():
    # The guest's processes sit in the root cgroup, which may hold processes and still give
    # controllers to children (the root is exempt from the no-internal-processes rule).
    with open(f"{CG}/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids +cpu +cpuset")
    m = CgroupManager.detect(instance=f"vmtest-{os.getpid()}")
    m.cleanup_stale()
    yield m
    m.close()


class Child:
    """A process started in a run's cgroup: placed before it execs, as the launcher places init
    (the child blocks on a pipe until the parent has written its pid to cgroup.procs)."""

    def __init__(self, run, argv: list[str], capture: bool = False) -> None:
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe() if capture else (-1, -1)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(go_w)
                if capture:
                    os.close(out_r)
                    os.dup2(out_w, 1)
                os.read(go_r, 1)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        os.close(go_r)
        if capture:
            os.close(out_w)
        self.pid, self._out = pid, out_r
        try:
            run.add_pid(pid)
        finally:
            os.write(go_w, b"g")
            os.close(go_w)

    def readline(self) -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            b = os.read(self._out, 1)
            if not b:
                break
            buf += b
        return buf

    def wait(self) -> tuple[int | None, int | None, bytes]:
        """(exit code, signal, rest of stdout)."""
        out = b""
        if self._out >= 0:
            while (b := os.read(self._out, 65536)):
                out += b
            os.close(self._out)
        _, st = os.waitpid(self.pid, 0)
        return (os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
                os.WTERMSIG(st) if os.WIFSIGNALED(st) else None, out)


def test_detects_pure_v2_with_kill_and_peak(mgr):
    run = mgr.create("detect", Limits(memory_bytes=64 * MiB, pids=16))
    try:
        info = mgr.info()
        assert info["version"] == 2
        assert info["features"]["cgroup_kill"] and info["features"]["memory_peak"]
        rb = run.readback()
        assert rb["pids_max"] == 16 and rb["swap_limit_bytes"] == 0
        d = run.dirs[0]
        assert open(f"{d}/memory.max").read().strip() == str(64 * MiB)
        assert open(f"{d}/pids.max").read().strip() == "16"
        assert open(f"{d}/memory.swap.max").read().strip() == "0"
    finally:
        run.remove()


def test_memory_max_oom_kills_a_real_allocation(mgr):
    run = mgr.create("oom", Limits(memory_bytes=32 * MiB, pids=16))
    try:
        # 128 MiB, every page written: far over the limit, no swap to hide in.
        p = Child(run, [PY, "-I", "-S", "-c", "b = b'x' * (128 << 20); print('survived')"],
                  capture=True)
        assert p.wait() == (None, signal.SIGKILL, b"")
        assert run.oom_kills() >= 1
        assert _keyed(f"{run.dirs[0]}/memory.events")["oom_kill"] >= 1
        peak = run.memory_peak()
        assert 24 * MiB <= peak <= 32 * MiB, peak
    finally:
        run.remove()


def test_a_run_under_its_limit_is_not_killed(mgr):
    run = mgr.create("fits", Limits(memory_bytes=128 * MiB, pids=16))
    try:
        p = Child(run, [PY, "-I", "-S", "-c", "b = b'x' * (32 << 20); print('ok')"], capture=True)
        assert p.wait() == (0, None, b"ok\n")
        assert run.oom_kills() == 0 and run.memory_peak() >= 32 * MiB
    finally:
        run.remove()


def test_pids_max_stops_a_fork_loop(mgr):
    run = mgr.create("pids", Limits(memory_bytes=256 * MiB, pids=6))
    code = textwrap.dedent("""
        import os, time
        n = 0
        try:
            while n < 50:
                if os.fork() == 0:
                    time.sleep(30); os._exit(0)
                n += 1
        except OSError as e:
            print(n, e.errno)
    """)
    try:
        p = Child(run, [PY, "-I", "-S", "-c", code], capture=True)
        line = p.readline().split()
        # 6 tasks in all: the loop itself and 5 children; the 6th fork fails with EAGAIN.
        assert [int(x) for x in line] == [5, 11]
        assert _keyed(f"{run.dirs[0]}/pids.events")["max"] >= 1
        run.kill_all()
        assert p.wait()[1] == signal.SIGKILL
    finally:
        run.remove()


def test_cpu_stat_counts_usage_and_cpu_max_throttles(mgr):
    run = mgr.create("cpu", Limits(memory_bytes=256 * MiB, pids=16, cpu_quota=0.25))
    code = "import time\nwhile time.process_time() < 0.3: pass\n"
    try:
        t0 = time.monotonic()
        p = Child(run, [PY, "-I", "-S", "-c", code])
        assert p.wait() == (0, None, b"")
        wall = time.monotonic() - t0
        # wait() can return before the exiting task's last slice is charged (the parent is woken
        # in exit_notify, before the task's final schedule), so the two reads are compared once
        # the counter has settled, as two reads in a row that agree.
        for _ in range(100):
            used = run.cpu_usage_ns()
            stat = _keyed(f"{run.dirs[0]}/cpu.stat")
            if stat["usage_usec"] * 1000 == used:
                break
            time.sleep(0.01)
        assert used >= 300_000_000 and stat["usage_usec"] * 1000 == used, (used, stat)
        # A quarter of a CPU: 0.3 s of CPU cannot take much less than 1.2 s.
        assert stat["nr_throttled"] >= 1 and wall >= 0.9, (wall, stat)
    finally:
        run.remove()


def test_cgroup_kill_ends_every_process(mgr):
    run = mgr.create("kill", Limits(memory_bytes=256 * MiB, pids=16))
    try:
        p = Child(run, ["/bin/sh", "-c", "sleep 600 & sleep 600 & sleep 600 & wait"])
        for _ in range(200):
            if len(run.pids()) >= 4:
                break
            time.sleep(0.05)
        assert len(run.pids()) == 4
        run.kill_all()
        assert run.pids() == []
        assert p.wait()[1] == signal.SIGKILL
        assert "populated 0" in open(f"{run.dirs[0]}/cgroup.events").read()
    finally:
        run.remove()


def test_no_internal_processes_is_refused_not_worked_around():
    """An instance cgroup that holds a process cannot give controllers to run cgroups (the v2
    rule): sandboxd says so instead of moving someone else's process."""
    m = CgroupManager.detect(instance=f"vmtest-busy-{os.getpid()}")
    d = f"{CG}/sandboxd-vmtest-busy-{os.getpid()}"
    os.mkdir(d)
    p = subprocess.Popen(["sleep", "600"])
    try:
        with open(f"{d}/cgroup.procs", "w") as f:
            f.write(str(p.pid))
        with pytest.raises(LaunchError, match="the instance cgroup holds processes"):
            m.create("r", Limits())
    finally:
        p.kill()
        p.wait()
        for _ in range(100):
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.05)


ROOTLESS = textwrap.dedent("""
    # Runs as an unprivileged user who owns {deleg} (as systemd's Delegate=yes arranges).
    import json, os, signal, subprocess, sys
    sys.path.insert(0, {root!r})
    from sandboxd.plan import Limits
    from sandboxd.runtime.cgroups import CgroupManager
    d = {deleg!r}
    # Leave the delegated cgroup itself empty (no internal processes), then enable controllers.
    os.mkdir(d + "/supervisor")
    open(d + "/supervisor/cgroup.procs", "w").write(str(os.getpid()))
    open(d + "/cgroup.subtree_control", "w").write("+memory +pids +cpu")
    mgr = CgroupManager.detect(root="/" + os.path.basename(d), instance="rootless")
    run = mgr.create("r1", Limits(memory_bytes=32 << 20, pids=8))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w); os.read(r, 1)
        os.execv({py!r}, [{py!r}, "-I", "-S", "-c", "b = b'x' * (128 << 20)"])
    os.close(r)
    run.add_pid(pid)
    os.write(w, b"g")
    _, status = os.waitpid(pid, 0)
    out = {{"uid": os.getuid(), "dir": run.dirs[0], "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
           "oom_kills": run.oom_kills(), "version": mgr.info()["version"]}}
    run.remove()
    mgr.close()
    print(json.dumps(out))
""")


def test_rootless_user_runs_cgroups_in_a_delegated_subtree():
    deleg = f"{CG}/sandboxd-vm-deleg-{os.getpid()}"
    os.mkdir(deleg)
    # Delegation as systemd does it: the directory and the files that manage its subtree.
    for f in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(deleg, f) if f else deleg, 65534, 65534)

    def enter_and_drop() -> None:
        with open(f"{deleg}/cgroup.procs", "w") as f:     # root places the process, once
            f.write(str(os.getpid()))
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    try:
        r = subprocess.run([sys.executable, "-I", "-c",
                            ROOTLESS.format(root=ROOT, deleg=deleg, py=PY)],
                           capture_output=True, text=True, preexec_fn=enter_and_drop, cwd="/",
                           timeout=240)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["uid"] == 65534 and out["version"] == 2
        assert out["dir"] == f"{deleg}/sandboxd-rootless/run-r1"
        assert out["signal"] == signal.SIGKILL and out["oom_kills"] >= 1
    finally:
        for d in (f"{deleg}/sandboxd-rootless/run-r1", f"{deleg}/sandboxd-rootless",
                  f"{deleg}/supervisor", deleg):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
