"""Per-run cgroups: resource limits and accounting, cgroup v1 and v2 behind one interface.

Theory of operation
-------------------
The launcher owns one `CgroupManager`. `CgroupManager.detect()` reads the host's cgroup mounts
(/proc/self/mountinfo) and the cgroups the daemon is in (/proc/self/cgroup) and decides, writing
nothing:

* the version: 2 when `fs_root` itself is a cgroup2 mount; otherwise v1, controller by
  controller (a hybrid host's controller-less cgroup2 at `fs_root`/unified is ignored);
* the base directory of each hierarchy: the daemon's own cgroup there, or the configured `root`.

Everything sandboxd creates lives below a base, in cgroups named for it:

    <base>/sandboxd-<instance>/             instance cgroup: made on first use, holds only runs
    <base>/sandboxd-<instance>/run-<run_id>/   one per run: limits, the workload, removed at the end

That name is the only mark of ownership, so sandboxd writes to, empties or removes no cgroup whose
path is not of this shape; the base itself is only read.

A run is made in steps that stay apart: validate the limits and turn them into a list of file
writes (`plan_v1_writes` / `plan_v2_writes`: pure, testable without root), make the directories,
write, then read every limit back and compare, because the kernel rounds (memory to pages) and
an attestation must report what is in force, not what was asked. The launcher places the child
before exec by writing its pid to each of `RunCgroup.procs_files`; for its spares it makes a run
with no limits ahead of time and gives it the plan's limits with `retune()`. At the end
`remove()` kills what is left and removes the directories.

Killing is the delicate part: a fork bomb races any "list, then kill" loop, and with a small
pid_max a listed pid can exit and be reused by an unrelated process before the signal. So v2
uses cgroup.kill where the kernel has it (one write, atomic). Otherwise it is rounds of SIGKILL
to every listed member, which end because pids.max bounds the tree and each round kills every
process it saw; when a round finds members the previous one did not (the tree forks as fast as
we kill) the cgroup is frozen once (v2 cgroup.freeze, v1 freezer), signalled while nothing can
fork, and thawed. Freezing is not the first step because on v1 it costs 5-30 ms per run on
current kernels, against well under 1 ms for a round. Every signal goes through a pidfd opened
while the pid was still listed in the cgroup, never a bare pid.

All cgroupfs access goes through `CgroupFs`, so unit tests can run the v2 (and co-mounted v1)
logic against a temporary directory laid out like a cgroup filesystem.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from sandboxd.errors import HostCapabilityError, LaunchError, PlanError, SandboxError
from sandboxd.plan import Limits

__all__ = [
    "CgroupFs", "CgroupManager", "RunCgroup", "Mount", "Write",
    "parse_mountinfo", "parse_proc_cgroup", "parse_cpuset", "plan_v1_writes", "plan_v2_writes",
    "CPU_PERIOD_US", "INSTANCE_PREFIX", "RUN_PREFIX",
]

CPU_PERIOD_US = 100_000        # CFS period for cpu quotas: 100 ms, the kernel's default
_CPU_QUOTA_MIN_US = 1_000      # the kernel refuses quotas below 1 ms
# v1 shows "no memory limit" as PAGE_COUNTER_MAX pages in bytes (9223372036854771712 on x86-64);
# anything this large is no limit.
_V1_UNLIMITED_BYTES = 1 << 62
_PAGE = os.sysconf("SC_PAGE_SIZE")

INSTANCE_PREFIX = "sandboxd-"
RUN_PREFIX = "run-"
# Instance and run names become path components: no "/", no leading dot (so never "." or ".."),
# short enough for any filesystem.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

# Controllers every run needs (limits the plan always carries, and CPU accounting) and those
# used only when present: cpuset only when a plan asks for it, freezer to kill reliably on v1.
V1_REQUIRED = ("memory", "pids", "cpu", "cpuacct")
V1_OPTIONAL = ("cpuset", "freezer")
V2_REQUIRED = ("memory", "pids", "cpu")
V2_OPTIONAL = ("cpuset",)

KILL_TIMEOUT_S = 5.0           # kill_all gives up (LaunchError) if the cgroup is not empty by then
_FREEZE_TIMEOUT_S = 1.0        # a task in uninterruptible sleep can keep a freezer FREEZING
_RMDIR_TIMEOUT_S = 1.0         # rmdir can see EBUSY briefly while the last exits are accounted
_PIDFD_BATCH = 256             # pidfds open at once while killing
_EXIT_WAIT_S = 1.0             # after a kill-everything step, how long exits may take before the
                               # SIGKILL loop takes over (freeing a large address space takes time)


# -- the kernel seam ------------------------------------------------------------------------------

class CgroupFs:
    """Every cgroupfs access sandboxd makes. Raises plain OSError; callers name the step.

    Unit tests pass a subclass that plays the kernel over a temporary directory (mkdir creates the
    interface files, writes are normalised as the kernel would).
    """

    def read(self, path: str) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while True:
                b = os.read(fd, 65536)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks).decode()
        finally:
            os.close(fd)

    def write(self, path: str, data: str) -> None:
        # One write() per value: cgroupfs parses each write on its own (one pid per write).
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def lock(self, path: str) -> int:
        """flock(LOCK_EX|LOCK_NB) a directory; the returned fd holds the lock until closed.
        BlockingIOError when another open file holds it."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)


# -- parse (pure) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields cgroup detection needs."""

    root: str                  # path inside the filesystem shown at the mountpoint ("/" usually)
    mountpoint: str
    fstype: str                # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]    # super options; on v1 they name the hierarchy's controllers


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        f = line.split()
        try:
            sep = f.index("-", 6)      # optional fields end with a lone "-"
        except ValueError:
            continue
        if len(f) < sep + 4:
            continue
        mounts.append(Mount(root=_unescape(f[3]), mountpoint=_unescape(f[4]), fstype=f[sep + 1],
                            options=frozenset(f[sep + 3].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """/proc/<pid>/cgroup -> ({v1 controller: cgroup path}, v2 cgroup path or None)."""
    v1: dict[str, str] = {}
    v2 = None
    for line in text.splitlines():
        if not line:
            continue
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and ctrls == "":
            v2 = path
            continue
        for c in ctrls.split(","):
            if c:
                v1[c] = path
    return v1, v2


_CPUSET_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*\Z")


def parse_cpuset(s: str) -> frozenset[int]:
    """"0-2,5" -> {0, 1, 2, 5}. An empty string is the empty set. ValueError when malformed."""
    s = s.strip()
    if not s:
        return frozenset()
    if not _CPUSET_RE.match(s):
        raise ValueError(f"not a CPU list: {s!r} (want e.g. \"0\", \"0-1\", \"0,2-3\")")
    out: set[int] = set()
    for part in s.split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if b < a:
            raise ValueError(f"not a CPU list: {s!r} (range {part} runs backwards)")
        out.update(range(a, b + 1))
    return frozenset(out)


def _format_cpuset(cpus: frozenset[int]) -> str:
    parts, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _keyed(text: str) -> dict[str, int]:
    """Flat keyed files ("oom_kill 3" per line): memory.events, cpu.stat, memory.oom_control."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def _max_or_int(text: str) -> int | None:
    t = text.strip()
    return None if t == "max" else int(t)


def _check_name(name: str, what: str, exc: type[SandboxError]) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise exc(f"{what} {name!r} is not a valid cgroup name", step="cgroup_validate",
                  hint="use 1-64 characters from A-Z a-z 0-9 _ . -, not starting with . or -")


# -- validate and decide: limits -> file writes (pure) --------------------------------------------

@dataclass(frozen=True)
class Write:
    """One value written to one cgroup file of a run."""

    controller: str            # the v1 hierarchy it belongs to (v2: the controller, for errors)
    file: str                  # file name inside the run's cgroup directory
    value: str
    # False: a failed write is an error. True: recorded in readback and the run goes on; only
    # for settings another control already guarantees (v1 swappiness: memsw already forbids swap).
    best_effort: bool = False


def _validate_limits(limits: Limits) -> tuple[frozenset[int] | None, int | None]:
    """Check the cgroup-relevant fields; return (cpuset, cpu quota in us per CPU_PERIOD_US)."""
    problems = []

    def positive_int(name: str, v: Any, minimum: int = 1) -> None:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
            problems.append(f"limits.{name} = {v!r}: want an integer >= {minimum} or null")

    positive_int("memory_bytes", limits.memory_bytes, _PAGE)
    positive_int("pids", limits.pids)
    quota_us = None
    q = limits.cpu_quota
    if q is not None:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0:
            problems.append(f"limits.cpu_quota = {q!r}: want a number of CPUs > 0 or null")
        else:
            quota_us = round(q * CPU_PERIOD_US)
            if quota_us < _CPU_QUOTA_MIN_US:
                problems.append(f"limits.cpu_quota = {q!r}: below the kernel's minimum of "
                                f"{_CPU_QUOTA_MIN_US / CPU_PERIOD_US} CPU")
    cpus = None
    if limits.cpuset is not None:
        try:
            cpus = parse_cpuset(limits.cpuset) if isinstance(limits.cpuset, str) else None
            if not cpus:
                raise ValueError(f"{limits.cpuset!r} names no CPU")
        except ValueError as e:
            problems.append(f"limits.cpuset: {e}")
    if problems:
        raise PlanError("; ".join(problems), step="cgroup_validate")
    return cpus, quota_us


def _check_cpuset_available(cpus: frozenset[int], available: frozenset[int], where: str) -> None:
    if not cpus <= available:
        raise HostCapabilityError(
            f"cpuset {_format_cpuset(cpus)} asks for CPUs {_format_cpuset(cpus - available)} "
            f"that sandboxd's cgroup may not use (it has {_format_cpuset(available) or 'none'})",
            step="cgroup_validate", path=where, hint="ask for a subset of those CPUs")


def plan_v1_writes(limits: Limits, *, has_memsw: bool, has_swappiness: bool,
                   host_swap_bytes: int, cpuset_cpus: frozenset[int] | None = None,
                   cpuset_mems: str | None = None) -> list[Write]:
    """The v1 writes for `limits`, in order, for a run cgroup with no limits yet. Host facts
    come in as arguments.

    `cpuset_cpus`/`cpuset_mems`: what the instance cgroup has, when a cpuset hierarchy is used
    (None: none is). A run always joins it then, so a run made without a cpuset can be given
    one by `retune` while its processes are already in place.
    """
    cpus, quota_us = _validate_limits(limits)
    w: list[Write] = []
    if limits.memory_bytes is not None:
        # limit first: the kernel refuses memsw below the memory limit.
        w.append(Write("memory", "memory.limit_in_bytes", str(limits.memory_bytes)))
        if has_memsw:
            # memory+swap capped at the memory cap: a page swapped out still counts, so swap
            # cannot extend the limit and reclaim does not try it.
            w.append(Write("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes)))
        elif host_swap_bytes > 0:
            raise HostCapabilityError(
                "the host has swap but no swap accounting (memory.memsw.* missing), so the "
                "memory limit could be exceeded into swap", step="cgroup_plan",
                path="memory.memsw.limit_in_bytes",
                hint="boot with swapaccount=1 (cgroup v1 swap accounting), or swapoff -a")
    # A new v1 memory cgroup inherits oom_kill_disable from its parent; with it set, a run at
    # its limit would hang instead of having a process killed.
    w.append(Write("memory", "memory.oom_control", "0"))
    if has_swappiness:
        w.append(Write("memory", "memory.swappiness", "0", best_effort=True))
    if limits.pids is not None:
        w.append(Write("pids", "pids.max", str(limits.pids)))
    if quota_us is not None:
        w.append(Write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
        w.append(Write("cpu", "cpu.cfs_quota_us", str(quota_us)))
    if cpuset_cpus is None or cpuset_mems is None:
        if cpus is not None:
            raise HostCapabilityError(
                "limits.cpuset is set but no cgroup v1 cpuset hierarchy is usable",
                step="cgroup_plan", hint="mount the cpuset controller "
                "(mount -t cgroup -o cpuset cgroup /sys/fs/cgroup/cpuset) or drop limits.cpuset")
    else:
        if cpus is not None:
            _check_cpuset_available(cpus, cpuset_cpus, "cpuset.cpus")
        # v1 cpusets start empty and take no task until both are set: mems as the instance
        # has, cpus as asked or else all the instance has.
        w.append(Write("cpuset", "cpuset.mems", cpuset_mems))
        w.append(Write("cpuset", "cpuset.cpus", _format_cpuset(cpus or cpuset_cpus)))
    return w


def plan_v2_writes(limits: Limits, *, has_swap_max: bool, host_swap_bytes: int,
                   has_cpuset: bool, cpuset_cpus: frozenset[int] | None = None) -> list[Write]:
    """The v2 writes for `limits`, in order. memory.oom.group stays 0 on purpose: the OOM killer
    then kills one process, and the launcher reports which one."""
    cpus, quota_us = _validate_limits(limits)
    w: list[Write] = []
    if limits.memory_bytes is not None:
        w.append(Write("memory", "memory.max", str(limits.memory_bytes)))
    if has_swap_max:
        # Swap off whether or not memory is limited: swap would hide memory use from the limit.
        w.append(Write("memory", "memory.swap.max", "0"))
    elif host_swap_bytes > 0:
        raise HostCapabilityError(
            "the host has swap but memory.swap.max is missing (no swap accounting)",
            step="cgroup_plan", path="memory.swap.max",
            hint="boot with swapaccount=1, or swapoff -a")
    if limits.pids is not None:
        w.append(Write("pids", "pids.max", str(limits.pids)))
    if quota_us is not None:
        w.append(Write("cpu", "cpu.max", f"{quota_us} {CPU_PERIOD_US}"))
    if cpus is not None:
        if not has_cpuset or cpuset_cpus is None:
            raise HostCapabilityError(
                "limits.cpuset is set but the cpuset controller is not enabled for sandboxd's "
                "cgroups", step="cgroup_plan", hint="enable it in cgroup.subtree_control of the "
                "base cgroup (echo +cpuset > .../cgroup.subtree_control) or drop limits.cpuset")
        _check_cpuset_available(cpus, cpuset_cpus, "cpuset.cpus.effective")
        w.append(Write("cpuset", "cpuset.cpus", _format_cpuset(cpus)))
    return w


def _host_swap_bytes(fs: CgroupFs, proc: str) -> int:
    for line in fs.read(os.path.join(proc, "meminfo")).splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _cgroup_limits(limits: Limits) -> tuple[Any, ...]:
    """The fields of Limits this module puts in a cgroup."""
    return (limits.memory_bytes, limits.pids, limits.cpu_quota, limits.cpuset)


_NO_LIMITS = (None, None, None, None)


def _verify(limits: Limits, rb: dict[str, Any]) -> list[str]:
    """Compare what the kernel reports with what was asked; a list of mismatches."""
    bad = []
    m = limits.memory_bytes
    got = rb.get("memory_limit_bytes")
    # The kernel keeps limits in pages: it may round down, never by a page or more.
    if (m is None) != (got is None) or (m is not None and not m - _PAGE < got <= m):
        bad.append(f"memory limit {got} (asked {m})")
    if m is not None and rb.get("swap_limit_bytes") != 0:
        bad.append(f"swap limit {rb.get('swap_limit_bytes')} (asked 0)")
    if rb.get("pids_max") != limits.pids:
        bad.append(f"pids.max {rb.get('pids_max')} (asked {limits.pids})")
    q = None if limits.cpu_quota is None else round(limits.cpu_quota * CPU_PERIOD_US)
    if rb.get("cpu_quota_us") != q or (q is not None and rb.get("cpu_period_us") != CPU_PERIOD_US):
        bad.append(f"cpu quota {rb.get('cpu_quota_us')}/{rb.get('cpu_period_us')} us "
                   f"(asked {q}/{CPU_PERIOD_US})")
    if rb.get("oom_kill_disable", 0) != 0:
        bad.append(f"oom_kill_disable {rb['oom_kill_disable']} (asked 0)")
    if rb.get("memory_oom_group", 0) != 0:
        bad.append(f"memory.oom.group {rb['memory_oom_group']} (want 0: one process is killed "
                   "and reported)")
    if limits.cpuset is not None and parse_cpuset(rb.get("cpuset_cpus") or "") != \
            parse_cpuset(limits.cpuset):
        bad.append(f"cpuset.cpus {rb.get('cpuset_cpus')!r} (asked {limits.cpuset!r})")
    return bad


# -- small helpers that name what failed ----------------------------------------------------------

def _write(fs: CgroupFs, path: str, value: str, step: str) -> None:
    try:
        fs.write(path, value)
    except OSError as e:
        if e.errno == _errno.ENOENT and fs.isdir(os.path.dirname(path)):
            raise HostCapabilityError(
                f"cannot write {value!r}: the kernel offers no {os.path.basename(path)} here",
                step=step, path=path, errno=e.errno,
                hint="the controller or feature behind this file is missing on this host "
                     "(kernel config or boot options)") from None
        raise LaunchError(f"failed to write {value!r}", step=step, path=path,
                          errno=e.errno) from None


def _read(fs: CgroupFs, path: str, step: str = "cgroup_read") -> str:
    try:
        return fs.read(path)
    except OSError as e:
        raise LaunchError("failed to read", step=step, path=path, errno=e.errno) from None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _cgroup_dir(mount: Mount, cgroup_path: str) -> str | None:
    """Directory of `cgroup_path` in `mount`, or None when the mount does not show it."""
    top = mount.root.rstrip("/")
    if not _under(cgroup_path, top or "/"):
        return None
    rel = cgroup_path[len(top):].strip("/")
    return os.path.join(mount.mountpoint, rel) if rel else mount.mountpoint


def _flock_holder(path: str) -> str:
    """Who holds the flock on `path`, from /proc/locks, for the error message."""
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and dev in parts:
                    pid = int(parts[parts.index(dev) - 1])
                    if os.path.exists(f"/proc/{pid}"):
                        return f"locked by pid {pid}"
                    return (f"locked by pid {pid}, which has exited: a child it forked still "
                            "holds the lock fd; kill it, or it ends with its run")
    except (OSError, ValueError):
        pass
    return "holder unknown"


def _check_root(root: str) -> None:
    if not root.startswith("/") or os.path.normpath(root) != root or "/.." in root:
        raise SandboxError(f"cgroup root {root!r} must be an absolute, normalised cgroup path",
                           step="cgroup_config", hint='e.g. "/sandboxd.slice"')


# -- run cgroups ----------------------------------------------------------------------------------

class RunCgroup:
    """One run's cgroup (one directory per hierarchy on v1). Made by CgroupManager.create().

    Picklable on purpose (plain data, no fd or lock): the launcher hands it to the run's
    supervisor, which polls cpu_usage_ns() itself.
    """

    version: int

    def __init__(self, fs: CgroupFs, run_id: str, dirs: dict[str, str]) -> None:
        self._fs = fs
        self.run_id = run_id
        self._dir = dict(dirs)                  # controller (v1) or "" (v2) -> directory
        self._owned: list[str] = []             # directories this object made or adopted
        self._removed = False
        self._peak_seen = 0
        self._limits: tuple[Any, ...] | None = None   # what create()/retune() put in force
        self._readback: dict[str, Any] | None = None   # and what the kernel said of it then
        self.best_effort_failed: list[str] = []   # best-effort writes that failed, with why

    @property
    def dirs(self) -> list[str]:
        """The run's cgroup directories that exist because of this object."""
        return list(self._owned)

    @property
    def procs_files(self) -> list[str]:
        """cgroup.procs of each hierarchy: write a pid to each to place that process."""
        return [os.path.join(d, "cgroup.procs") for d in self._owned]

    def add_pid(self, pid: int) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise LaunchError(f"add_pid: {pid!r} is not a pid", step="cgroup_add_pid")
        for f in self.procs_files:
            _write(self._fs, f, str(pid), "cgroup_add_pid")

    def pids(self, first_only: bool = False) -> list[int]:
        """Processes (thread group ids) in the run, over every hierarchy (first_only: the first
        hierarchy's list, one read: the runtime places each process in all of them)."""
        out: set[int] = set()
        for f in self.procs_files[:1] if first_only else self.procs_files:
            try:
                out.update(int(x) for x in self._fs.read(f).split())
            except FileNotFoundError:
                continue                        # removed already: nothing in it
            except OSError as e:
                raise LaunchError("failed to read", step="cgroup_read", path=f,
                                  errno=e.errno) from None
        return sorted(out)

    # -- stats (per backend) --
    def cpu_usage_ns(self) -> int:
        """CPU time of every process and thread that has been in the run, in nanoseconds."""
        raise NotImplementedError


    def memory_peak(self) -> int:
        raise NotImplementedError

    def reset_peak(self) -> bool:
        """Restart the memory high-water mark from now (a staged spare's own set-up must not
        count as the run's peak). False where the kernel cannot: cgroup v2 before 6.12 has no
        reset, and 6.12's is per open file, so the peak there includes the staging (a few MiB
        of init's and the stub's pages), which the attestation says."""
        return False

    def oom_kills(self) -> int:
        raise NotImplementedError

    def readback(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- ending a run --
    def kill_all(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL every process in the run and wait until the cgroup is empty (see the module
        docstring for the order of methods). LaunchError when it is not empty by `timeout`.

        Does not reap: the launcher reaps its own child; the rest are reparented and reaped by
        their subreaper. An exited, unreaped process no longer counts as in the cgroup.
        """
        if not self._owned or not self._populated():
            return                              # the usual case: the workload has exited
        deadline = time.monotonic() + timeout
        if self._kill_whole(deadline):
            return
        # Rounds: each signals every member listed. New members can only be children of
        # processes not yet dead, and pids.max bounds how many there can be, so this ends; a
        # member not seen before means the tree is forking as fast as we kill, and then it is
        # frozen once (freezing costs milliseconds on some kernels, so not by default).
        seen: set[int] = set()
        wait = 0.01
        escalated = False
        while True:
            listed = self._signal_members()
            forking = bool(seen) and not listed <= seen
            seen |= listed
            if self._wait_empty(min(deadline, time.monotonic() + wait)):
                return
            if forking and not escalated:
                escalated = True
                if self._freeze_and_kill(deadline):
                    return
            wait = min(wait * 2, 0.1)
            if time.monotonic() >= deadline:
                left = self.pids()
                raise LaunchError(f"processes {left[:20]} still in the cgroup after SIGKILL for "
                                  f"{timeout:.1f}s", step="cgroup_kill",
                                  path=self._owned[0] if self._owned else None,
                                  hint="a process stuck in uninterruptible sleep (D state)?")

    def remove(self) -> None:
        """kill_all, then remove the run's directories. Idempotent."""
        if self._removed:
            return
        errors: list[SandboxError] = []
        try:
            self.kill_all()
        except SandboxError as e:
            errors.append(e)                    # still try to remove what can be removed
        for d in reversed(self._owned):
            try:
                self._rmdir(d)
            except SandboxError as e:
                errors.append(e)
        if errors:
            first = errors[0]
            for e in errors[1:]:
                first.add_note(f"also: {e}")
            raise first
        self._removed = True

    # -- internals shared by both backends --
    def _populated(self) -> bool:
        return bool(self.pids())

    def _kill_whole(self, deadline: float) -> bool:
        """Kill the whole cgroup in one step where the kernel can (v2 cgroup.kill): True when
        it is empty afterwards."""
        return False

    def _freeze_and_kill(self, deadline: float) -> bool:
        """Freeze, signal every member, thaw, wait: True when empty afterwards. False when the
        backend has no freezer or it did not empty the cgroup."""
        return False

    def _wait_empty(self, deadline: float) -> bool:
        delay = 0.0002
        while True:
            if not self._populated():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _signal_members(self) -> set[int]:
        """SIGKILL each member through a pidfd opened while its pid was listed in the cgroup.

        A pid listed both before and after the pidfd was opened names, at signal time, either
        the pidfd's process or a member that reused the pid; a pid that went to a process
        outside the run is not listed the second time and is left alone. Returns the pids
        listed first. Batches keep the number of open pidfds bounded whatever pids.max is.
        """
        listed = self.pids()
        for i in range(0, len(listed), _PIDFD_BATCH):
            fds: dict[int, int] = {}
            try:
                for pid in listed[i:i + _PIDFD_BATCH]:
                    try:
                        fds[pid] = os.pidfd_open(pid)
                    except ProcessLookupError:
                        pass                    # gone already
                    except OSError as e:
                        raise LaunchError(f"pidfd_open({pid}) failed", step="cgroup_kill",
                                          errno=e.errno) from None
                still = set(self.pids())
                for pid, fd in fds.items():
                    if pid in still:
                        try:
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            finally:
                for fd in fds.values():
                    os.close(fd)
        return set(listed)

    def _rmdir(self, d: str) -> None:
        deadline = time.monotonic() + _RMDIR_TIMEOUT_S
        while True:
            try:
                self._fs.rmdir(d)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != _errno.EBUSY or time.monotonic() >= deadline:
                    hint = None
                    if e.errno in (_errno.EBUSY, _errno.ENOTEMPTY):
                        hint = ("it still has processes or child cgroups; sandboxd makes no "
                                "child cgroups in a run, so something else did")
                    raise LaunchError("failed to remove the run cgroup", step="cgroup_remove",
                                      path=d, errno=e.errno, hint=hint) from None
                self._signal_members()
                time.sleep(0.002)

    def _mkdirs(self) -> None:
        for d in dict.fromkeys(self._dir.values()):
            try:
                self._fs.mkdir(d)
            except FileExistsError:
                raise LaunchError("the run cgroup already exists", step="cgroup_create", path=d,
                                  errno=_errno.EEXIST,
                                  hint="a duplicate run_id, or a leftover of a crash: call "
                                       "cleanup_stale() at startup") from None
            except OSError as e:
                raise LaunchError("failed to create the run cgroup", step="cgroup_create",
                                  path=d, errno=e.errno) from None
            self._owned.append(d)

    def _apply(self, writes: list[Write]) -> list[str]:
        """Write the plan; returns the best-effort writes that failed, as 'file: reason'."""
        skipped = []
        for w in writes:
            path = os.path.join(self._dir[w.controller if self.version == 1 else ""], w.file)
            try:
                _write(self._fs, path, w.value, "cgroup_apply")
            except SandboxError as e:
                if not w.best_effort:
                    raise
                skipped.append(f"{w.file}: {e}")
        return skipped


class _V1Run(RunCgroup):
    version = 1

    def __init__(self, fs: CgroupFs, run_id: str, dirs: dict[str, str], *, proc: str,
                 has_memsw: bool) -> None:
        super().__init__(fs, run_id, dirs)
        self._proc = proc
        self._has_memsw = has_memsw

    def _f(self, controller: str, name: str) -> str:
        return os.path.join(self._dir[controller], name)

    def cpu_usage_ns(self) -> int:
        return int(_read(self._fs, self._f("cpuacct", "cpuacct.usage")))


    def memory_peak(self) -> int:
        # The memory counter's high-water mark: what the limit is compared against.
        return int(_read(self._fs, self._f("memory", "memory.max_usage_in_bytes")))

    def reset_peak(self) -> bool:
        # v1: writing 0 restarts the high-water mark from the current usage.
        _write(self._fs, self._f("memory", "memory.max_usage_in_bytes"), "0", "cgroup_reset_peak")
        return True

    def oom_kills(self) -> int:
        return _keyed(_read(self._fs, self._f("memory", "memory.oom_control")))["oom_kill"]

    def readback(self) -> dict[str, Any]:
        fs = self._fs

        def v1_bytes(name: str) -> int | None:
            n = int(_read(fs, self._f("memory", name)))
            return None if n >= _V1_UNLIMITED_BYTES else n

        limit = v1_bytes("memory.limit_in_bytes")
        rb: dict[str, Any] = {"version": 1, "memory_limit_bytes": limit}
        if self._has_memsw:
            memsw = v1_bytes("memory.memsw.limit_in_bytes")
            rb["memsw_limit_bytes"] = memsw
            if limit is not None and memsw is not None:
                rb["swap_limit_bytes"] = memsw - limit
                rb["swap"] = "off: memory.memsw.limit_in_bytes = memory.limit_in_bytes"
            else:
                rb["swap_limit_bytes"] = None
                rb["swap"] = "not limited (no memory limit)"
        else:
            swap = _host_swap_bytes(fs, self._proc)
            rb["swap_limit_bytes"] = 0 if swap == 0 else None
            rb["swap"] = ("off: host has no swap (SwapTotal 0), no swap accounting"
                          if swap == 0 else "not limited: no swap accounting")
        try:
            rb["memory_swappiness"] = int(fs.read(self._f("memory", "memory.swappiness")))
        except OSError:
            rb["memory_swappiness"] = None
        rb["oom_kill_disable"] = _keyed(_read(fs, self._f("memory", "memory.oom_control")))\
            .get("oom_kill_disable")
        rb["pids_max"] = _max_or_int(_read(fs, self._f("pids", "pids.max")))
        quota = int(_read(fs, self._f("cpu", "cpu.cfs_quota_us")))
        rb["cpu_quota_us"] = None if quota < 0 else quota
        rb["cpu_period_us"] = int(_read(fs, self._f("cpu", "cpu.cfs_period_us")))
        if "cpuset" in self._dir:
            rb["cpuset_cpus"] = _read(fs, self._f("cpuset", "cpuset.cpus")).strip()
            rb["cpuset_mems"] = _read(fs, self._f("cpuset", "cpuset.mems")).strip()
        else:
            rb["cpuset_cpus"] = None            # not restricted by sandboxd: inherited
        if self.best_effort_failed:
            rb["best_effort_failed"] = list(self.best_effort_failed)
        rb["cgroups"] = self.dirs
        return rb

    def _freeze_and_kill(self, deadline: float) -> bool:
        d = self._dir.get("freezer")
        if d is None or d not in self._owned:
            return False
        state = os.path.join(d, "freezer.state")
        try:
            # Frozen, nothing forks or exits: one listing is complete and its pids stay valid.
            self._freeze(state, min(deadline, time.monotonic() + _FREEZE_TIMEOUT_S))
            self._signal_members()
        finally:
            # v1 delivers SIGKILL to a frozen task only once thawed.
            _write(self._fs, state, "THAWED", "cgroup_kill")
        return self._wait_empty(min(deadline, time.monotonic() + _EXIT_WAIT_S))

    def _freeze(self, state: str, deadline: float) -> bool:
        while True:
            # Writing FROZEN again moves a cgroup stuck in FREEZING on (kernel freezer docs).
            _write(self._fs, state, "FROZEN", "cgroup_kill")
            if _read(self._fs, state).strip() == "FROZEN":
                return True
            if time.monotonic() >= deadline:
                return False                    # signal anyway; the loop in kill_all finishes
            time.sleep(0.0005)


class _V2Run(RunCgroup):
    version = 2

    def __init__(self, fs: CgroupFs, run_id: str, d: str, *, proc: str, has_kill: bool,
                 has_peak: bool, has_swap_max: bool) -> None:
        super().__init__(fs, run_id, {"": d})
        self._proc = proc
        self._has_kill = has_kill
        self._has_peak = has_peak
        self._has_swap_max = has_swap_max

    def _f(self, name: str) -> str:
        return os.path.join(self._dir[""], name)

    def cpu_usage_ns(self) -> int:
        return _keyed(_read(self._fs, self._f("cpu.stat")))["usage_usec"] * 1000


    def memory_peak(self) -> int:
        if self._has_peak:
            return int(_read(self._fs, self._f("memory.peak")))
        # Kernels before 5.19 keep no high-water mark: the caller polls this during the run.
        self._peak_seen = max(self._peak_seen, int(_read(self._fs, self._f("memory.current"))))
        return self._peak_seen

    def oom_kills(self) -> int:
        return _keyed(_read(self._fs, self._f("memory.events")))["oom_kill"]

    def readback(self) -> dict[str, Any]:
        fs = self._fs
        rb: dict[str, Any] = {"version": 2,
                              "memory_limit_bytes": _max_or_int(_read(fs, self._f("memory.max")))}
        if self._has_swap_max:
            rb["swap_limit_bytes"] = _max_or_int(_read(fs, self._f("memory.swap.max")))
            rb["swap"] = "off: memory.swap.max = 0" if rb["swap_limit_bytes"] == 0 else "on"
        else:
            swap = _host_swap_bytes(fs, self._proc)
            rb["swap_limit_bytes"] = 0 if swap == 0 else None
            rb["swap"] = ("off: host has no swap (SwapTotal 0), no swap accounting"
                          if swap == 0 else "not limited: no swap accounting")
        rb["memory_oom_group"] = int(_read(fs, self._f("memory.oom.group")))
        rb["pids_max"] = _max_or_int(_read(fs, self._f("pids.max")))
        quota, _, period = _read(fs, self._f("cpu.max")).strip().partition(" ")
        rb["cpu_quota_us"] = _max_or_int(quota)
        rb["cpu_period_us"] = int(period)
        if fs.exists(self._f("cpuset.cpus")):
            rb["cpuset_cpus"] = _read(fs, self._f("cpuset.cpus")).strip() or None
            rb["cpuset_cpus_effective"] = _read(fs, self._f("cpuset.cpus.effective")).strip()
        else:
            rb["cpuset_cpus"] = None
        rb["cgroups"] = self.dirs
        return rb

    def _populated(self) -> bool:
        # "populated" covers the whole subtree and costs one read.
        if self._dir[""] not in self._owned:
            return False
        try:
            return _keyed(self._fs.read(self._f("cgroup.events"))).get("populated", 0) != 0
        except FileNotFoundError:
            return False
        except OSError as e:
            raise LaunchError("failed to read", step="cgroup_read",
                              path=self._f("cgroup.events"), errno=e.errno) from None

    def _kill_whole(self, deadline: float) -> bool:
        if not self._has_kill or self._dir[""] not in self._owned:
            return False
        # The kernel kills the whole subtree, forks in flight included: no race at all.
        _write(self._fs, self._f("cgroup.kill"), "1", "cgroup_kill")
        return self._wait_empty(min(deadline, time.monotonic() + _EXIT_WAIT_S))

    def _freeze_and_kill(self, deadline: float) -> bool:
        if self._dir[""] not in self._owned:
            return False
        freeze = self._f("cgroup.freeze")
        try:
            _write(self._fs, freeze, "1", "cgroup_kill")
            end = min(deadline, time.monotonic() + _FREEZE_TIMEOUT_S)
            while _keyed(_read(self._fs, self._f("cgroup.events"))).get("frozen") != 1:
                if time.monotonic() >= end:
                    break                       # signal anyway; the loop in kill_all finishes
                time.sleep(0.0005)
            self._signal_members()              # v2 lets SIGKILL through to frozen tasks
        finally:
            _write(self._fs, freeze, "0", "cgroup_kill")
        return self._wait_empty(min(deadline, time.monotonic() + _EXIT_WAIT_S))


# -- the manager ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Hierarchy:
    mountpoint: str
    base_cgroup: str           # cgroup path of the base, as /proc/self/cgroup writes it
    base_dir: str              # its directory


class CgroupManager:
    """Creates and cleans up run cgroups below one base per hierarchy. One per launcher process.

    Use `CgroupManager.detect()`; it returns the v1 or v2 backend.
    """

    version: int

    def __init__(self, *, instance: str, fs: CgroupFs, proc: str, fs_root: str,
                 hier: dict[str, _Hierarchy], unavailable: dict[str, str]) -> None:
        self.instance = instance
        self._fs = fs
        self._proc = proc
        self._fs_root = fs_root
        self._hier = hier                     # controller -> hierarchy (co-mounted ones share)
        self._unavailable = unavailable       # optional controller -> why it is not used
        self._lock = threading.Lock()
        self._ready = False
        self._locks: dict[str, int] = {}       # instance dir -> fd holding its flock

    # -- detect -----------------------------------------------------------------------------
    @classmethod
    def detect(cls, *, root: str | None = None, instance: str = "default",
               fs_root: str = "/sys/fs/cgroup", proc: str = "/proc",
               fs: CgroupFs | None = None) -> "CgroupManager":
        """Find the cgroup layout and check it can do what sandboxd needs. Writes nothing.

        root: a cgroup path (e.g. "/sandboxd.slice") to use as the base in every hierarchy
        instead of the daemon's own cgroup; it must exist. proc and fs are seams for tests.
        Raises HostCapabilityError naming each required controller that is missing.
        """
        _check_name(instance, "instance", SandboxError)
        if root is not None:
            _check_root(root)
        fs = fs or CgroupFs()
        fs_root = os.path.normpath(fs_root)
        mounts = parse_mountinfo(_read(fs, os.path.join(proc, "self/mountinfo"), "cgroup_detect"))
        own_v1, own_v2 = parse_proc_cgroup(_read(fs, os.path.join(proc, "self/cgroup"),
                                                 "cgroup_detect"))
        at_root = [m for m in mounts if m.mountpoint == fs_root]
        if at_root and at_root[-1].fstype == "cgroup2":       # the last mount there is visible
            return _V2Manager._detect(at_root[-1], own_v2, root=root, instance=instance,
                                      fs=fs, proc=proc, fs_root=fs_root)
        return _V1Manager._detect(mounts, own_v1, root=root, instance=instance, fs=fs,
                                  proc=proc, fs_root=fs_root)

    # -- public interface -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What was detected: version, base and instance directories, controllers, features."""
        return {
            "version": self.version,
            "instance": self.instance,
            "fs_root": self._fs_root,
            "bases": {c: h.base_dir for c, h in sorted(self._hier.items())},
            "instance_dirs": self._instance_dirs(),
            "controllers": sorted(self._hier),
            "unavailable": dict(self._unavailable),
            "features": self._features(),
        }

    def create(self, run_id: str, limits: Limits) -> RunCgroup:
        """Make the run's cgroup, apply `limits`, read them back and compare.

        On any failure, what this call made is removed and the error says which file failed.
        """
        _check_name(run_id, "run_id", PlanError)
        self._ensure_instance()
        writes = self._plan(limits)             # decided (and refused) before anything is made
        run = self._new_run(run_id)
        try:
            run._mkdirs()
            self._tune(run, limits, writes)
        except BaseException as e:
            try:
                run.remove()
            except SandboxError as ce:
                e.add_note(f"cleanup after the failure also failed: {ce}")
            raise
        return run

    def retune(self, run: RunCgroup, limits: Limits) -> dict[str, Any]:
        """Write `limits` into a run made earlier (a launcher spare, whose processes may already
        be in it), then read back and compare, as create() does. Returns the readback. Limits
        equal to the ones it has already cost nothing (the read-back of their writing is
        returned); other limits are first lifted, then written in a fresh cgroup's order (v1
        refuses a memory limit above memsw, and memsw below the limit). On failure the run is
        left as it is: the caller removes it."""
        want = _cgroup_limits(limits)
        if run._limits == want and run._readback is not None:
            return dict(run._readback)
        writes = self._plan(limits)
        if run._limits != _NO_LIMITS:
            writes = self._lift_writes(run) + writes
        return self._tune(run, limits, writes)

    def _lift_writes(self, run: RunCgroup) -> list[Write]:
        """Writes that take a run's memory, pids and CPU quota limits back to none."""
        raise NotImplementedError

    def _tune(self, run: RunCgroup, limits: Limits, writes: list[Write]) -> dict[str, Any]:
        run.best_effort_failed = run._apply(writes)
        rb = run.readback()
        bad = _verify(limits, rb)
        if bad:
            raise LaunchError("the kernel reports other limits than were written: "
                              + "; ".join(bad), step="cgroup_verify",
                              path=run.dirs[0] if run.dirs else None)
        run._limits = _cgroup_limits(limits)
        run._readback = dict(rb)
        return rb

    def cleanup_stale(self) -> list[str]:
        """Remove the run cgroups a previous process of this instance left (killing their
        processes first). Touches only <base>/sandboxd-<instance>/run-<valid id>. Returns the
        directories removed. Call at startup, before any create()."""
        self._ensure_instance()                 # learns how this kernel kills a cgroup
        runs: set[str] = set()
        for inst in self._instance_dirs():
            try:
                names = self._fs.listdir(inst)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise LaunchError("failed to list", step="cgroup_cleanup", path=inst,
                                  errno=e.errno) from None
            for n in names:
                rid = n[len(RUN_PREFIX):]
                if n.startswith(RUN_PREFIX) and _NAME_RE.match(rid) and \
                        self._fs.isdir(os.path.join(inst, n)):
                    runs.add(rid)
        removed: list[str] = []
        errors: list[SandboxError] = []
        for rid in sorted(runs):
            run = self._new_run(rid)
            run._owned = [d for d in dict.fromkeys(run._dir.values()) if self._fs.isdir(d)]
            try:
                run.remove()
                removed.extend(run.dirs)
            except SandboxError as e:
                errors.append(e)
        if errors:
            for e in errors[1:]:
                errors[0].add_note(f"also: {e}")
            raise errors[0]
        return removed

    def close(self) -> None:
        """Remove the instance cgroups (daemon shutdown). Every run must be removed first."""
        with self._lock:
            for d in reversed(self._instance_dirs()):
                try:
                    self._fs.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise LaunchError("failed to remove the instance cgroup", step="cgroup_close",
                                      path=d, errno=e.errno,
                                      hint="runs are still there: remove() them first") from None
            self._unlock()
            self._ready = False

    # -- shared by both backends -------------------------------------------------------------
    def _make_instance_dirs(self) -> None:
        """mkdir the instance cgroups (they may exist) and lock them for this process.

        The lock is what makes cleanup_stale() safe: a live daemon holds it, so another process
        of the same instance name fails here instead of killing that daemon's runs as "stale".
        It is an flock on the directories themselves, so a crash releases it. Every hierarchy
        is locked because bases differ per hierarchy (here memory is per daemon, pids shared).
        The fds are O_CLOEXEC, but a child forked without exec shares them and so the lock:
        such a child must close them (the launcher's supervisors close every fd they do not
        use), or it keeps the instance locked after the daemon is gone; the error names it.
        """
        for d in self._instance_dirs():
            try:
                self._fs.mkdir(d)
            except FileExistsError:
                pass
            except OSError as e:
                raise LaunchError("failed to create the instance cgroup", step="cgroup_instance",
                                  path=d, errno=e.errno) from None
            if d in self._locks:
                continue
            try:
                self._locks[d] = self._fs.lock(d)
            except BlockingIOError:
                raise LaunchError(f"instance {self.instance!r} is in use by another sandboxd "
                                  f"process ({_flock_holder(d)})", step="cgroup_instance",
                                  path=d, errno=_errno.EWOULDBLOCK,
                                  hint="give each daemon on a host its own instance name "
                                       "(RuntimeConfig.instance)") from None
            except OSError as e:
                raise LaunchError("failed to lock the instance cgroup", step="cgroup_instance",
                                  path=d, errno=e.errno) from None

    def _unlock(self) -> None:
        while self._locks:
            os.close(self._locks.popitem()[1])

    def __del__(self) -> None:
        # A manager dropped without close() still lets go of its instance.
        try:
            self._unlock()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- backend hooks ----------------------------------------------------------------------
    def _hierarchies(self) -> list[_Hierarchy]:
        return list(dict.fromkeys(self._hier.values()))

    def _instance_dirs(self) -> list[str]:
        return [os.path.join(h.base_dir, INSTANCE_PREFIX + self.instance)
                for h in self._hierarchies()]

    def _ensure_instance(self) -> None:
        raise NotImplementedError

    def _plan(self, limits: Limits) -> list[Write]:
        raise NotImplementedError

    def _new_run(self, run_id: str) -> RunCgroup:
        raise NotImplementedError

    def _features(self) -> dict[str, Any]:
        raise NotImplementedError


class _V1Manager(CgroupManager):
    version = 1

    def __init__(self, *, has_memsw: bool, has_swappiness: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self._has_memsw = has_memsw
        self._has_swappiness = has_swappiness
        self._cpuset_cpus: frozenset[int] | None = None
        self._cpuset_mems: str | None = None

    @classmethod
    def _detect(cls, mounts: list[Mount], own: dict[str, str], *, root: str | None,
                instance: str, fs: CgroupFs, proc: str, fs_root: str) -> "_V1Manager":
        v1 = [m for m in mounts if m.fstype == "cgroup" and _under(m.mountpoint, fs_root)]
        hier: dict[str, _Hierarchy] = {}
        why: dict[str, str] = {}
        hint: dict[str, str] = {}
        for c in V1_REQUIRED + V1_OPTIONAL:
            m = next((m for m in v1 if c in m.options), None)
            if m is None:
                why[c] = f"no cgroup v1 hierarchy with {c!r} is mounted under {fs_root}"
                hint[c] = (f"mount it (mkdir -p {fs_root}/{c} && mount -t cgroup -o {c} cgroup "
                           f"{fs_root}/{c}), or if this kernel gives {c!r} to cgroup v2, run on "
                           "a pure cgroup v2 host")
                continue
            cg = root or own.get(c)
            if cg is None:
                why[c] = f"{c!r} is not listed in {proc}/self/cgroup"
                continue
            d = _cgroup_dir(m, cg)
            if d is None:
                why[c] = (f"cgroup {cg} is outside the part of the {c!r} hierarchy mounted at "
                          f"{m.mountpoint} (which shows {m.root})")
                continue
            if not fs.isdir(d):
                why[c] = f"the base cgroup {d} does not exist"
                hint[c] = (f"create {cg} in the {c} hierarchy, or unset the cgroup root"
                           if root else "")
                continue
            # Co-mounted controllers ("cpu,cpuacct") share one hierarchy object, so a run
            # makes one directory for both.
            same = next((h for h in hier.values() if h.mountpoint == m.mountpoint), None)
            hier[c] = same or _Hierarchy(m.mountpoint, cg, d)
        missing = [c for c in V1_REQUIRED if c not in hier]
        if missing:
            raise HostCapabilityError(
                "required cgroup v1 controllers are not usable: "
                + "; ".join(f"{c}: {why[c]}" for c in missing),
                step="cgroup_detect", path=fs_root,
                hint="; ".join(f"{c}: {hint[c]}" for c in missing if hint.get(c)) or None)
        mem = hier["memory"].base_dir
        oom = _keyed(_read(fs, os.path.join(mem, "memory.oom_control"), "cgroup_detect"))
        if "oom_kill" not in oom:
            # Without it a memory-limit kill cannot be told from any other SIGKILL.
            raise HostCapabilityError("memory.oom_control has no oom_kill counter",
                                      step="cgroup_detect",
                                      path=os.path.join(mem, "memory.oom_control"),
                                      hint="needs Linux 4.13 or later")
        return cls(instance=instance, fs=fs, proc=proc, fs_root=fs_root, hier=hier,
                   unavailable={c: why[c] for c in V1_OPTIONAL if c in why},
                   has_memsw=fs.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")),
                   has_swappiness=fs.exists(os.path.join(mem, "memory.swappiness")))

    def _features(self) -> dict[str, Any]:
        return {"memsw": self._has_memsw, "swappiness": self._has_swappiness,
                "freezer": "freezer" in self._hier, "cpuset": "cpuset" in self._hier}

    def _ensure_instance(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            self._make_instance_dirs()
            if "cpuset" in self._hier:
                self._cpuset_cpus, self._cpuset_mems = self._setup_cpuset()
            self._ready = True

    def _setup_cpuset(self) -> tuple[frozenset[int], str]:
        # A new v1 cpuset is empty and takes no task: give our instance cgroup its parent's
        # CPUs and memory nodes, once (only when still empty, so runs keep working).
        h = self._hier["cpuset"]
        d = os.path.join(h.base_dir, INSTANCE_PREFIX + self.instance)
        out = []
        for name in ("cpuset.cpus", "cpuset.mems"):
            mine = _read(self._fs, os.path.join(d, name), "cgroup_instance").strip()
            if not mine:
                mine = _read(self._fs, os.path.join(h.base_dir, name), "cgroup_instance").strip()
                _write(self._fs, os.path.join(d, name), mine, "cgroup_instance")
            out.append(mine)
        return parse_cpuset(out[0]), out[1]

    def _plan(self, limits: Limits) -> list[Write]:
        # Swap can appear after startup (swapon), so it is looked at per run, and only on a
        # host without memsw, where it decides between "swap is off anyway" and an error.
        swap = 0 if self._has_memsw else _host_swap_bytes(self._fs, self._proc)
        return plan_v1_writes(limits, has_memsw=self._has_memsw,
                              has_swappiness=self._has_swappiness, host_swap_bytes=swap,
                              cpuset_cpus=self._cpuset_cpus, cpuset_mems=self._cpuset_mems)

    def _lift_writes(self, run: RunCgroup) -> list[Write]:
        w = []
        if self._has_memsw:
            w.append(Write("memory", "memory.memsw.limit_in_bytes", "-1"))   # memsw first: >= limit
        w.append(Write("memory", "memory.limit_in_bytes", "-1"))
        w.append(Write("pids", "pids.max", "max"))
        w.append(Write("cpu", "cpu.cfs_quota_us", "-1"))
        return w

    def _new_run(self, run_id: str) -> RunCgroup:
        sub = os.path.join(INSTANCE_PREFIX + self.instance, RUN_PREFIX + run_id)
        dirs = {c: os.path.join(h.base_dir, sub) for c, h in self._hier.items()}
        return _V1Run(self._fs, run_id, dirs, proc=self._proc, has_memsw=self._has_memsw)


class _V2Manager(CgroupManager):
    version = 2

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._has_kill = self._has_peak = self._has_swap_max = False
        self._cpuset_cpus: frozenset[int] | None = None

    @classmethod
    def _detect(cls, mount: Mount, own: str | None, *, root: str | None, instance: str,
                fs: CgroupFs, proc: str, fs_root: str) -> "_V2Manager":
        cg = root or own
        if cg is None:
            raise HostCapabilityError(f"{proc}/self/cgroup has no cgroup v2 entry",
                                      step="cgroup_detect", path=f"{proc}/self/cgroup")
        d = _cgroup_dir(mount, cg)
        if d is None or not fs.isdir(d):
            raise HostCapabilityError(
                f"the base cgroup {cg} is not visible under {fs_root}", step="cgroup_detect",
                path=d or fs_root, hint=(f"create it (mkdir {fs_root}{cg}) or unset the "
                                         "cgroup root" if root else None))

        def words(name: str) -> set[str]:
            return set(_read(fs, os.path.join(d, name), "cgroup_detect").split())

        available, enabled = words("cgroup.controllers"), words("cgroup.subtree_control")
        procs = words("cgroup.procs") if cg != "/" else set()
        missing = [c for c in V2_REQUIRED if c not in enabled]
        if missing:
            parent = os.path.dirname(d) if cg != "/" else d
            lines = []
            for c in missing:
                if c not in available:
                    lines.append(f"{c}: not offered to the base (not in {d}/cgroup.controllers); "
                                 f"enable it in cgroup.subtree_control of {parent}, or run under "
                                 f"systemd with Delegate=yes")
                else:
                    lines.append(f"{c}: not enabled for the base's children; enable it in "
                                 f"{d}/cgroup.subtree_control (echo +{c} > ...)")
            hint = "; ".join(lines)
            if procs:
                # cgroup v2 lets a cgroup with processes enable no controller for children.
                hint += (f"; {d} itself holds processes, which cgroup v2 forbids in a cgroup "
                         "that enables controllers for its children: set the cgroup root to a "
                         "cgroup with no processes (systemd: Delegate=yes with "
                         "DelegateSubgroup=, and the service's cgroup as root)")
            raise HostCapabilityError("required cgroup v2 controllers are not available below "
                                      "the base: " + ", ".join(missing), step="cgroup_detect",
                                      path=os.path.join(d, "cgroup.subtree_control"), hint=hint)
        h = _Hierarchy(mount.mountpoint, cg, d)
        hier = {c: h for c in V2_REQUIRED + V2_OPTIONAL if c in enabled}
        unavailable = {c: f"not enabled in {d}/cgroup.subtree_control"
                       for c in V2_OPTIONAL if c not in enabled}
        return cls(instance=instance, fs=fs, proc=proc, fs_root=fs_root, hier=hier,
                   unavailable=unavailable)

    def _features(self) -> dict[str, Any]:
        return {"cgroup_kill": self._has_kill, "memory_peak": self._has_peak,
                "swap_max": self._has_swap_max, "cpuset": "cpuset" in self._hier,
                "facts_known": self._ready}

    def _ensure_instance(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            fs = self._fs
            self._make_instance_dirs()
            d = self._instance_dirs()[0]
            procs = _read(fs, os.path.join(d, "cgroup.procs"), "cgroup_instance").split()
            if procs:
                # No internal processes: a cgroup with processes cannot give controllers to
                # children. sandboxd never puts one here; we do not move what someone else did.
                raise LaunchError(f"the instance cgroup holds processes {procs[:10]}; it must "
                                  "hold only run cgroups", step="cgroup_instance",
                                  path=os.path.join(d, "cgroup.procs"),
                                  hint="move those processes out (or stop them)")
            want = [c for c in V2_REQUIRED + V2_OPTIONAL if c in self._hier]
            sc = os.path.join(d, "cgroup.subtree_control")
            _write(fs, sc, " ".join("+" + c for c in want), "cgroup_instance")
            got = set(_read(fs, sc, "cgroup_instance").split())
            if not set(want) <= got:
                raise LaunchError(f"controllers {sorted(set(want) - got)} did not enable",
                                  step="cgroup_instance", path=sc)
            # Feature files, looked for in a cgroup of ours that has the controllers.
            self._has_kill = fs.exists(os.path.join(d, "cgroup.kill"))           # Linux 5.14
            self._has_peak = fs.exists(os.path.join(d, "memory.peak"))           # Linux 5.19
            self._has_swap_max = fs.exists(os.path.join(d, "memory.swap.max"))
            if "cpuset" in self._hier:
                self._cpuset_cpus = parse_cpuset(_read(
                    fs, os.path.join(d, "cpuset.cpus.effective"), "cgroup_instance"))
            self._ready = True

    def _plan(self, limits: Limits) -> list[Write]:
        swap = 0 if self._has_swap_max else _host_swap_bytes(self._fs, self._proc)
        return plan_v2_writes(limits, has_swap_max=self._has_swap_max, host_swap_bytes=swap,
                              has_cpuset="cpuset" in self._hier, cpuset_cpus=self._cpuset_cpus)

    def _lift_writes(self, run: RunCgroup) -> list[Write]:
        w = [Write("memory", "memory.max", "max"), Write("pids", "pids.max", "max"),
             Write("cpu", "cpu.max", f"max {CPU_PERIOD_US}")]
        if run._limits and run._limits[3] is not None:
            w.append(Write("cpuset", "cpuset.cpus", ""))     # empty: the parent's again
        return w

    def _new_run(self, run_id: str) -> RunCgroup:
        d = os.path.join(self._instance_dirs()[0], RUN_PREFIX + run_id)
        return _V2Run(self._fs, run_id, d, proc=self._proc, has_kill=self._has_kill,
                      has_peak=self._has_peak, has_swap_max=self._has_swap_max)


# -- operator tool: `python -m sandboxd.runtime.cgroups info|bench [N]` ----------------------------

def _bench(n: int) -> None:
    """Median time of create + add_pid + remove, with a live child (remove kills it) and with
    an exited one (the usual end of a run)."""
    import json
    import statistics

    mgr = CgroupManager.detect(instance=f"bench-{os.getpid()}")
    mgr.cleanup_stale()
    lim = Limits(memory_bytes=64 << 20, pids=16, cpu_quota=1.0)
    results = {}
    for mode in ("live", "exited"):
        times = []
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                os.read(r, 1)                   # wait until placed
                if mode == "live":
                    signal.pause()
                os._exit(0)
            os.close(r)
            t0 = time.perf_counter()
            run = mgr.create(f"b{i}", lim)
            run.add_pid(pid)
            t1 = time.perf_counter()
            os.write(w, b"x")
            os.close(w)
            if mode == "exited":
                os.waitpid(pid, 0)
            t2 = time.perf_counter()
            run.remove()
            t3 = time.perf_counter()
            if mode == "live":
                os.waitpid(pid, 0)
            times.append((t1 - t0) + (t3 - t2))
        results[mode] = {"runs": n, "median_ms": round(statistics.median(times) * 1e3, 3),
                         "p90_ms": round(sorted(times)[int(n * 0.9)] * 1e3, 3)}
    mgr.close()
    print(json.dumps({"version": mgr.version, "create_add_pid_remove": results}, indent=2))


if __name__ == "__main__":
    import json
    import sys

    cmd = sys.argv[1] if len(sys.argv) > 1 else "info"
    if cmd == "info":
        print(json.dumps(CgroupManager.detect().info(), indent=2))
    elif cmd == "bench":
        _bench(int(sys.argv[2]) if len(sys.argv) > 2 else 200)
    else:
        sys.exit("usage: python -m sandboxd.runtime.cgroups info|bench [N]")
