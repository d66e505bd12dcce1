"""cgroups on the real kernel: limits that bite, accounting that counts, kills that empty.

Each test forks a child, places it with `add_pid` while it waits on a pipe, releases it, and
watches the kernel act: the OOM killer, pids.max refusing fork(), CPU time accounted, a forking
tree emptied. The tests run through `CgroupManager.detect()` and so use this host's backend
(v1 here; the same tests run on pure v2 in the VM tier). Every cgroup they touch is one they
made: a per-test instance name (`sandboxd-t<pid>-<n>`), and sibling cgroups named `sbxtest-*`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import signal
import statistics
import time

import pytest

from sandboxd.errors import HostCapabilityError, LaunchError
from sandboxd.plan import Limits
from sandboxd.runtime import cgroups as C

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("host lacks: root (cgroup tests create cgroups)", allow_module_level=True)

_seq = itertools.count()
MiB = 1 << 20
# The VM tier emulates the CPU (no KVM): only the time bounds are looser there.
SLOW = bool(os.environ.get("SANDBOXD_VM_TIER"))


@pytest.fixture
def mgr():
    m = C.CgroupManager.detect(instance=f"t{os.getpid()}-{next(_seq)}")
    yield m
    m.cleanup_stale()
    m.close()
    assert not any(os.path.exists(d) for d in m._instance_dirs())


class Child:
    """A forked child that waits to be released, runs `fn`, writes its JSON result, exits 0."""

    def __init__(self, fn):
        go_r, self._go_w = os.pipe()
        self._res_r, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                                    # ---- child
            code = 70
            try:
                os.close(self._go_w)
                os.close(self._res_r)
                os.read(go_r, 1)
                out = fn()
                os.write(res_w, json.dumps(out).encode() + b"\n")
                code = 0
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(res_w)
        self.status = None

    def go(self):
        os.write(self._go_w, b"g")
        os.close(self._go_w)

    def result(self):
        # Up to the newline, not EOF: the child's own children hold the pipe open.
        data = b""
        while not data.endswith(b"\n") and (chunk := os.read(self._res_r, 65536)):
            data += chunk
        os.close(self._res_r)
        return json.loads(data) if data else None

    def wait(self):
        _, self.status = os.waitpid(self.pid, 0)
        return self.status

    @property
    def killed_by(self):
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def touch(n: int) -> int:
    b = bytearray(n)
    b[::4096] = b"\x01" * len(range(0, n, 4096))              # every page written: really charged
    return len(b)


# -- memory ---------------------------------------------------------------------------------------

def test_memory_limit_oom_kills_the_child_and_peak_reaches_the_limit(mgr):
    limit = 64 * MiB
    run = mgr.create("oom", Limits(memory_bytes=limit))
    c = Child(lambda: touch(256 * MiB))
    run.add_pid(c.pid)
    c.go()
    c.wait()
    assert c.killed_by == signal.SIGKILL and c.result() is None
    assert run.oom_kills() >= 1
    assert limit * 0.9 <= run.memory_peak() <= limit
    run.remove()


def test_memory_below_the_limit_is_not_an_oom(mgr):
    run = mgr.create("fits", Limits(memory_bytes=128 * MiB))
    c = Child(lambda: touch(32 * MiB))
    run.add_pid(c.pid)
    c.go()
    c.wait()
    assert c.status == 0 and c.result() == 32 * MiB
    assert run.oom_kills() == 0
    assert 32 * MiB <= run.memory_peak() < 128 * MiB          # from the cgroup, not ru_maxrss
    run.remove()


def test_swap_is_off_in_the_readback(mgr):
    rb = mgr.create("swap", Limits(memory_bytes=64 * MiB)).readback()
    assert rb["swap_limit_bytes"] == 0 and rb["swap"].startswith("off")
    if mgr.version == 1 and mgr.info()["features"]["memsw"]:
        assert rb["memsw_limit_bytes"] == rb["memory_limit_bytes"] == 64 * MiB
        assert rb["memory_swappiness"] == 0


NO_LIMITS = Limits(memory_bytes=None, pids=None, cpu_quota=None, cpuset=None)


def test_retune_limits_a_spare_whose_process_is_already_in_place(mgr):
    """The launcher's spares: a run made with no limits, its process placed, limits later."""
    spare = mgr.create("spare", NO_LIMITS)
    c = Child(lambda: touch(256 * MiB))
    spare.add_pid(c.pid)
    cpus = sorted(os.sched_getaffinity(0))
    rb = mgr.retune(spare, Limits(memory_bytes=64 * MiB, pids=4, cpuset=str(cpus[0])))
    assert (rb["memory_limit_bytes"], rb["pids_max"], rb["cpuset_cpus"]) == (
        64 * MiB, 4, str(cpus[0]))
    assert os.sched_getaffinity(c.pid) == {cpus[0]}           # the placed process follows
    c.go()
    c.wait()
    assert c.killed_by == signal.SIGKILL and spare.oom_kills() >= 1
    spare.remove()


def test_retune_again_lifts_the_old_limits_then_applies_the_new(mgr):
    """A warm spare tuned for its layout's limits, taken by a run with other limits: on the
    real kernel (v1 here: memsw must stay >= the memory limit in both directions)."""
    spare = mgr.create("spare2", NO_LIMITS)
    c = Child(lambda: touch(96 * MiB))
    spare.add_pid(c.pid)
    rb1 = mgr.retune(spare, Limits(memory_bytes=64 * MiB, pids=4))
    assert mgr.retune(spare, Limits(memory_bytes=64 * MiB, pids=4)) == rb1     # no change: no writes
    rb = mgr.retune(spare, Limits(memory_bytes=160 * MiB, pids=8))
    assert (rb["memory_limit_bytes"], rb["pids_max"]) == (160 * MiB, 8)
    c.go()
    c.wait()
    assert c.killed_by is None and spare.oom_kills() == 0      # 96 MiB fits the new limit
    rb = mgr.retune(spare, Limits(memory_bytes=32 * MiB, pids=None))
    assert (rb["memory_limit_bytes"], rb["pids_max"]) == (32 * MiB, None)
    spare.remove()


# -- pids -----------------------------------------------------------------------------------------

def _fork_until_refused():
    n = 0
    while True:
        try:
            pid = os.fork()
        except OSError as e:
            return {"forked": n, "errno": e.errno}
        if pid == 0:
            signal.pause()
            os._exit(0)
        n += 1
        if n > 1000:
            return {"forked": n, "errno": None}


def test_pids_max_makes_fork_fail_with_eagain(mgr):
    run = mgr.create("pids", Limits(pids=8))
    c = Child(_fork_until_refused)
    run.add_pid(c.pid)
    c.go()
    assert c.result() == {"forked": 7, "errno": errno.EAGAIN}  # the child itself is the 8th
    members = run.pids()
    assert len(members) >= 7                                  # the child may have exited by now
    run.remove()                                              # kills the 7 paused ones too
    c.wait()
    assert run.pids() == [] and not any(alive(p) for p in members)


# -- cpu ------------------------------------------------------------------------------------------

def _spin(seconds: float):
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass
    return time.process_time() - t0


def test_cpu_usage_grows_by_the_cpu_the_child_burns(mgr):
    run = mgr.create("cpu", Limits())
    c = Child(lambda: _spin(0.4))
    run.add_pid(c.pid)
    before = run.cpu_usage_ns()
    c.go()
    burnt = c.result()
    c.wait()
    used = (run.cpu_usage_ns() - before) / 1e9
    # The cgroup also sees the child's wake-up, JSON and exit: a little more, never less.
    assert burnt - 0.01 <= used <= burnt + 0.06, (burnt, used)
    assert abs(pickle.loads(pickle.dumps(run)).cpu_usage_ns() - run.cpu_usage_ns()) < 1e6


def test_cpu_quota_throttles(mgr):
    run = mgr.create("quota", Limits(cpu_quota=0.25))
    rb = run.readback()
    assert (rb["cpu_quota_us"], rb["cpu_period_us"]) == (25_000, 100_000)

    def spin_wall(seconds=1.0):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return time.process_time()
    c = Child(spin_wall)
    run.add_pid(c.pid)
    before = run.cpu_usage_ns()
    c.go()
    c.result()
    c.wait()
    used = (run.cpu_usage_ns() - before) / 1e9
    # ~0.25 of 1 s, never ~1 s; less when the machine is busy
    assert 0.02 <= used <= 0.4, used


def test_cpuset_pins_the_child(mgr):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("host lacks: a second CPU to leave out of the cpuset")
    cpu = min(os.sched_getaffinity(0))
    run = mgr.create("cpuset", Limits(cpuset=str(cpu)))
    assert run.readback()["cpuset_cpus"] == str(cpu)
    c = Child(lambda: sorted(os.sched_getaffinity(0)))
    run.add_pid(c.pid)
    c.go()
    assert c.result() == [cpu]
    c.wait()
    with pytest.raises(HostCapabilityError, match="asks for CPUs 4095"):
        mgr.create("cpuset2", Limits(cpuset="4095"))


# -- kill and remove ------------------------------------------------------------------------------

def _fork_bomb():
    while True:
        try:
            os.fork()                                         # parent and child both go on
        except OSError:
            time.sleep(0.0005)


def _wait_for_bomb(run, n=20, timeout=10.0):
    end = time.monotonic() + timeout
    while len(run.pids()) <= n:
        assert time.monotonic() < end, "the fork bomb did not get going"
        time.sleep(0.01)
    time.sleep(0.05)                                          # let it hit pids.max and retry


def _bomb(mgr, name):
    run = mgr.create(name, Limits(pids=48))
    c = Child(_fork_bomb)
    run.add_pid(c.pid)
    c.go()
    _wait_for_bomb(run)
    return run, c


def test_kill_all_empties_a_fork_bomb(mgr):
    run, c = _bomb(mgr, "bomb")
    members = run.pids()
    t0 = time.monotonic()
    run.kill_all()
    took = time.monotonic() - t0
    assert run.pids() == []
    assert c.wait() is not None and c.killed_by == signal.SIGKILL
    assert not any(alive(p) for p in members)
    assert took < (10.0 if SLOW else 2.0), took
    run.remove()


def test_kill_all_without_a_freezer_still_wins_the_race(mgr, monkeypatch):
    # The plain SIGKILL rounds alone, as on a v1 host with no freezer hierarchy.
    cls = C._V1Run if mgr.version == 1 else C._V2Run
    monkeypatch.setattr(cls, "_freeze_and_kill", lambda self, deadline: False)
    monkeypatch.setattr(cls, "_kill_whole", lambda self, deadline: False)
    run, c = _bomb(mgr, "bomb2")
    run.kill_all()
    assert run.pids() == [] and c.wait() is not None and c.killed_by == signal.SIGKILL


def test_a_pid_that_left_the_cgroup_is_never_signalled():
    """pid reuse: a pid listed once, then gone from the cgroup (exited, and the number reused
    by someone else), must not be signalled. Here the "someone else" is a real process."""
    bystander = Child(lambda: signal.pause())
    bystander.go()

    class Scripted(C.RunCgroup):
        listings: list[list[int]] = []

        def pids(self):
            return self.listings.pop(0)
    try:
        Scripted.listings = [[bystander.pid], []]
        Scripted(C.CgroupFs(), "x", {})._signal_members()
        time.sleep(0.05)
        assert alive(bystander.pid)
        Scripted.listings = [[bystander.pid], [bystander.pid]]   # still a member: signalled
        Scripted(C.CgroupFs(), "x", {})._signal_members()
        assert bystander.wait() is not None and bystander.killed_by == signal.SIGKILL
    finally:
        if bystander.status is None:
            os.kill(bystander.pid, signal.SIGKILL)
            bystander.wait()


def test_freezer_path_empties_a_fork_bomb(mgr):
    """kill_all escalates to this only when a round of SIGKILLs loses the race, which cannot
    be forced; so it is called directly."""
    if mgr.version == 1 and "freezer" not in mgr.info()["controllers"]:
        pytest.skip("host lacks: a cgroup v1 freezer hierarchy")
    run, c = _bomb(mgr, "frz")
    assert run._freeze_and_kill(time.monotonic() + 5)
    assert run.pids() == [] and c.wait() is not None and c.killed_by == signal.SIGKILL
    if mgr.version == 1:
        state, thawed = os.path.join(run._dir["freezer"], "freezer.state"), "THAWED"
    else:
        state, thawed = run._f("cgroup.freeze"), "0"
    with open(state) as f:
        assert f.read().strip() == thawed                      # never left frozen
    run.remove()


def test_remove_leaves_nothing_and_is_idempotent(mgr):
    run = mgr.create("rm", Limits())
    c = Child(lambda: signal.pause())
    run.add_pid(c.pid)
    c.go()
    dirs = run.dirs
    assert dirs and all(os.path.isdir(d) for d in dirs)
    run.remove()
    assert not any(os.path.exists(d) for d in dirs)
    assert c.wait() is not None and c.killed_by == signal.SIGKILL
    run.remove()


def test_a_failed_write_names_the_file_and_removes_what_was_made(mgr):
    # A quota beyond the kernel's maximum (about 2**44 us) is refused by the kernel itself.
    with pytest.raises(LaunchError) as e:
        mgr.create("bad", Limits(cpu_quota=1e9))
    assert e.value.errno == errno.EINVAL
    assert e.value.path.endswith(("/cpu.cfs_quota_us", "/cpu.max"))
    assert not any(os.path.exists(os.path.join(d, "run-bad")) for d in mgr._instance_dirs())


def _crashed_daemon(instance: str):
    """A daemon of `instance` that makes two runs with a process each, then dies (os._exit in
    Child) without removing anything. Returns the runs' directories and the processes' pids."""
    mgr = C.CgroupManager.detect(instance=instance)
    dirs, pids = [], []
    for r in ("a", "b"):
        run = mgr.create(r, Limits())
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.closerange(3, ready_w)                          # as the launcher's children do,
            os.closerange(ready_w + 1, 1 << 16)                # the instance lock fds included
            os.write(ready_w, b"r")
            os.close(ready_w)
            signal.pause()
            os._exit(0)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r"                     # it no longer shares the lock
        os.close(ready_r)
        run.add_pid(pid)
        dirs += run.dirs
        pids.append(pid)
    return {"dirs": dirs, "pids": pids}


def test_an_instance_in_use_is_refused_and_its_runs_survive(mgr):
    run = mgr.create("live", Limits())
    c = Child(lambda: signal.pause())
    run.add_pid(c.pid)
    c.go()
    other = C.CgroupManager.detect(instance=mgr.instance)
    with pytest.raises(LaunchError) as e:
        other.cleanup_stale()
    assert e.value.errno == errno.EWOULDBLOCK
    assert f"locked by pid {os.getpid()})" in str(e.value)
    assert run.pids() == [c.pid] and alive(c.pid)
    run.remove()
    c.wait()


def test_cleanup_stale_removes_a_crashed_instance_and_nothing_else(mgr):
    crasher = Child(lambda: _crashed_daemon(mgr.instance))
    crasher.go()
    crashed = crasher.result()
    crasher.wait()                                             # the daemon is gone, its runs not
    left = crashed["dirs"]
    assert left and all(os.path.isdir(d) for d in left)
    assert all(alive(p) for p in crashed["pids"])
    # Cgroups this test made that sandboxd did not: a sibling of the instance, another instance
    # whose name starts like ours, and a non-run directory inside ours. Each holds a process.
    base = mgr.info()["bases"]["pids"]
    mine = os.path.join(base, C.INSTANCE_PREFIX + mgr.instance)
    foreign = [os.path.join(base, f"sbxtest-sibling-{os.getpid()}"),
               os.path.join(base, f"{C.INSTANCE_PREFIX}{mgr.instance}-other", "run-a"),
               os.path.join(mine, "keep")]
    bystanders = []
    try:
        for d in foreign:
            os.makedirs(d)
            c = Child(lambda: signal.pause())
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(c.pid))
            c.go()
            bystanders.append(c)
        removed = mgr.cleanup_stale()
        assert sorted(removed) == sorted(left) and not any(os.path.exists(d) for d in left)
        end = time.monotonic() + 5                            # orphans: reaped by init
        while any(alive(p) for p in crashed["pids"]) and time.monotonic() < end:
            time.sleep(0.01)
        assert not any(alive(p) for p in crashed["pids"])
        for c, d in zip(bystanders, foreign):
            assert alive(c.pid) and os.path.isdir(d)
            with open(os.path.join(d, "cgroup.procs")) as f:
                assert f.read().split() == [str(c.pid)]
    finally:
        for p in crashed["pids"]:                             # if cleanup_stale failed
            _kill_if_in(p, C.INSTANCE_PREFIX + mgr.instance + "/")
        for c in bystanders:
            os.kill(c.pid, signal.SIGKILL)
            c.wait()
        time.sleep(0.01)
        for d in [*reversed(foreign), os.path.dirname(foreign[1])]:
            if os.path.isdir(d):
                os.rmdir(d)


def _kill_if_in(pid: int, cgroup_part: str) -> None:
    """SIGKILL `pid` only while it is still in a cgroup whose path contains `cgroup_part` (a
    process this test made, not whoever has the pid number now)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            if cgroup_part in f.read():
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
    finally:
        os.close(fd)


def test_create_add_pid_remove_is_fast(mgr):
    times = []
    for i in range(30):
        c = Child(lambda: None)
        t0 = time.perf_counter()
        run = mgr.create(f"t{i}", Limits(memory_bytes=64 * MiB, pids=16, cpu_quota=1.0))
        run.add_pid(c.pid)
        t1 = time.perf_counter()
        c.go()
        c.wait()
        t2 = time.perf_counter()
        run.remove()
        times.append(t1 - t0 + time.perf_counter() - t2)
    med = statistics.median(times)
    print(f"create+add_pid+remove median {med * 1e3:.2f} ms over {len(times)} runs")
    assert med < (0.5 if SLOW else 0.05), med
