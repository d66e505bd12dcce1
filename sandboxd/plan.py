"""The resolved sandbox plan: the runtime's only input, and the result it returns.

The engine (policy, request, host facts) produces a `Plan`; the runtime applies it and never
reads a policy. Everything here is a frozen value with a JSON form, because the plan crosses a
process boundary (daemon -> launcher) and because `explain` prints exactly this.

Units are in the field names: *_ms milliseconds, *_bytes bytes. `None` means "no limit" only
where a field says so; every default is the safe one.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    """How the workload ended. A fixed vocabulary: judges map these to verdicts."""

    OK = "OK"                          # exited 0 within every limit
    RUNTIME_ERROR = "RUNTIME_ERROR"    # exited non-zero (exit_code says which)
    SIGNALED = "SIGNALED"              # killed by a signal the sandbox did not send (signal says which)
    TIME_LIMIT = "TIME_LIMIT"          # CPU time (all processes, from the cgroup) above the limit
    WALL_TIME_LIMIT = "WALL_TIME_LIMIT"  # real time above the limit
    MEMORY_LIMIT = "MEMORY_LIMIT"      # the memory cgroup OOM-killed a process of the run
    OUTPUT_LIMIT = "OUTPUT_LIMIT"      # stdout or stderr above its cap, or file size limit (SIGXFSZ)
    SYSCALL_DENIED = "SYSCALL_DENIED"  # a syscall whose profile action kills was made (denied says which)
    CANCELLED = "CANCELLED"            # the caller cancelled the run, or its deadline expired


@dataclass(frozen=True)
class IdRange:
    """One line of a uid_map/gid_map: `inside` .. inside+count-1 map to `outside` .. outside+count-1."""

    inside: int
    outside: int
    count: int = 1


@dataclass(frozen=True)
class UserPlan:
    """Who the workload is, inside and on the host."""

    # uid/gid the workload runs as inside its user namespace. Root inside (0) is allowed but
    # buys nothing: every capability is dropped unless `caps_keep` names it.
    inside_uid: int = 1000
    inside_gid: int = 1000
    # "per_run": each concurrent run gets its own host uid/gid from the launcher's range, so two
    # runs cannot signal, ptrace or read each other even if another layer failed.
    # "single": map to the launcher's own uid (rootless without subuid ranges); weaker, and
    # refused unless the plan allows it.
    uid_mode: str = "per_run"
    allow_single_uid: bool = False


@dataclass(frozen=True)
class Bind:
    """A bind mount from the host into the sandbox."""

    source: str            # absolute host path (already resolved by the engine, no symlinks out of its base)
    target: str            # absolute path inside the sandbox
    writable: bool = False  # read-only unless set; always nosuid, nodev
    optional: bool = False  # skip silently when `source` does not exist (for system dirs that vary by host)


@dataclass(frozen=True)
class Tmpfs:
    target: str
    size_bytes: int        # hard cap on the tmpfs; writes beyond it fail with ENOSPC
    mode: int = 0o1777


@dataclass(frozen=True)
class FilesystemPlan:
    """The new root. Built on a tmpfs in a private mount namespace, then pivot_root'ed into."""

    binds: tuple[Bind, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = ()
    # Symlinks to create in the new root (target path -> link text), e.g. /bin -> usr/bin on
    # merged-/usr hosts, so the layout matches the host's.
    symlinks: tuple[tuple[str, str], ...] = ()
    # Small generated files written on the root tmpfs before it goes read-only (target, text):
    # /etc/hosts, /etc/passwd, /etc/group naming the sandbox's own user and hostname.
    files: tuple[tuple[str, str], ...] = ()
    # The work directory. With `work_host_path` None it is a private tmpfs of `work_size_bytes`;
    # otherwise that host directory (owned by the run's host uid) is bound writable there.
    work_dir: str = "/box"
    work_host_path: str | None = None
    work_size_bytes: int = 64 << 20
    # Fresh /proc for the new pid namespace, with OCI's masked and read-only paths.
    proc: bool = True
    proc_masked: tuple[str, ...] = (
        "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
        "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/proc/acpi", "/proc/interrupts",
        "/proc/kallsyms", "/proc/sysrq-trigger",
    )
    proc_readonly: tuple[str, ...] = (
        "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
    )
    # Minimal /dev: these host device nodes are bound in; nothing else exists there.
    dev_nodes: tuple[str, ...] = ("null", "zero", "full", "random", "urandom", "tty")
    # Remount the new root's tmpfs read-only once it is built.
    root_readonly: bool = True


@dataclass(frozen=True)
class SeccompPlan:
    """Which seccomp profile, resolved to a file and its digest."""

    name: str                      # profile name, for reports
    path: str                      # Docker/OCI JSON profile file
    sha256: str                    # digest of the file; the launcher refuses a file that changed
    # Report syscalls the profile denies (its default action and its kill rules) by name in the
    # result, through seccomp user notification. Explicit ERRNO rules (compatibility shims such as
    # clone3 -> ENOSYS) are not reported.
    report_denials: bool = True


@dataclass(frozen=True)
class LandlockPlan:
    """Landlock: filesystem (and, by ABI, network and scope) rights derived from the plan."""

    enabled: bool = True
    # "required": refuse the run when the host's ABI cannot give what the plan needs.
    # "best_effort": apply what the ABI has and report what was not enforced.
    mode: str = "required"
    # Extra read-only / read-write paths beyond those the filesystem plan implies.
    extra_read: tuple[str, ...] = ()
    extra_write: tuple[str, ...] = ()
    # TCP ports the workload may bind/connect to (ABI >= 4). Empty means none.
    tcp_bind: tuple[int, ...] = ()
    tcp_connect: tuple[int, ...] = ()
    # Scope abstract unix sockets and signals to the sandbox (ABI >= 6).
    scope: bool = True


@dataclass(frozen=True)
class AppArmorPlan:
    profile: str | None = None   # profile name, None: not requested
    mode: str = "enforce"        # "enforce" or "complain"
    required: bool = False       # refuse the run when AppArmor is not available


@dataclass(frozen=True)
class NetworkPlan:
    """Which network the sandbox gets (sandboxd/network, docs/network.md)."""

    # "none": own netns with loopback only.
    # "segment": own netns plus one interface (eth0) on the bridge of segment `segment`, in
    #   sandboxd's own namespace; peers by name through the segment's hosts file; egress only
    #   to the segment's allowlist (from the daemon's network config, not from the plan).
    # "host": the host's network namespace, shared. Only when the policy allows it explicitly.
    mode: str = "none"
    # Segment name, required for "segment" and None otherwise. Resolved at load time against
    # the daemon's network config: an unknown name never reaches the plan.
    segment: str | None = None


@dataclass(frozen=True)
class Limits:
    """Every limit the runtime enforces. None means unlimited where allowed."""

    cpu_time_ms: int | None = 10_000   # CPU of all processes and threads (cgroup); TIME_LIMIT above it
    cpu_extra_ms: int = 0              # keep running this much past cpu_time_ms so the real use is reported
    wall_time_ms: int = 30_000         # real time from exec; WALL_TIME_LIMIT above it
    memory_bytes: int | None = 256 << 20   # memory cgroup limit, swap off; MEMORY_LIMIT on OOM kill
    pids: int | None = 64              # processes and threads, pids cgroup
    cpu_quota: float | None = None     # CPUs worth of time per period (cpu.max / cfs_quota), None: no quota
    cpuset: str | None = None          # e.g. "0" or "0-1"; None: inherit
    stdout_bytes: int = 16 << 20       # stdout cap; OUTPUT_LIMIT (run killed) beyond it
    stderr_bytes: int = 4 << 20        # stderr cap
    file_size_bytes: int = 64 << 20    # RLIMIT_FSIZE: largest file the workload may write
    stack_bytes: int = 8 << 20         # RLIMIT_STACK
    open_files: int = 256              # RLIMIT_NOFILE
    address_space_bytes: int | None = None  # RLIMIT_AS, off by default (breaks many runtimes)


@dataclass(frozen=True)
class Plan:
    """A fully resolved sandbox: what `explain` prints and the launcher applies, nothing else."""

    argv: tuple[str, ...]
    run_id: str = ""                   # unique per run; names the cgroup
    env: tuple[tuple[str, str], ...] = (("PATH", "/usr/local/bin:/usr/bin:/bin"), ("HOME", "/box"))
    cwd: str = "/box"
    hostname: str = "sandbox"
    user: UserPlan = field(default_factory=UserPlan)
    filesystem: FilesystemPlan = field(default_factory=FilesystemPlan)
    caps_keep: tuple[str, ...] = ()    # capability names kept (in every set, ambient too); default none
    seccomp: SeccompPlan | None = None
    landlock: LandlockPlan = field(default_factory=LandlockPlan)
    apparmor: AppArmorPlan = field(default_factory=AppArmorPlan)
    network: NetworkPlan = field(default_factory=NetworkPlan)
    limits: Limits = field(default_factory=Limits)
    # "kill": an output cap reached ends the run with OUTPUT_LIMIT (judge semantics).
    output_limit_action: str = "kill"

    # -- JSON form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return _from_jsonable(cls, d)

    @classmethod
    def from_json(cls, s: str | bytes) -> "Plan":
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class DeniedSyscall:
    name: str
    count: int
    action: str            # "kill" or "errno"


@dataclass
class Result:
    """What happened. Produced by the runtime for every run the sandbox itself completed."""

    status: Status
    exit_code: int | None = None
    signal: int | None = None
    cpu_time_ms: float = 0.0
    wall_time_ms: float = 0.0
    peak_memory_bytes: int = 0
    oom_kills: int = 0
    killed_by_sandbox: bool = False
    kill_reason: str | None = None
    denied_syscalls: list[DeniedSyscall] = field(default_factory=list)
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    # What was actually in force, read back from the kernel where it can be.
    attestation: dict[str, Any] = field(default_factory=dict)

    @property
    def signal_name(self) -> str | None:
        import signal as _signal
        if self.signal is None:
            return None
        try:
            return _signal.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"

    def to_dict(self, include_output: bool = True) -> dict[str, Any]:
        d = _to_jsonable(self)
        d["signal_name"] = self.signal_name
        if include_output:
            d["stdout"] = self.stdout.decode("utf-8", "backslashreplace")
            d["stderr"] = self.stderr.decode("utf-8", "backslashreplace")
        else:
            d.pop("stdout")
            d.pop("stderr")
        return d


def _to_jsonable(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _to_jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (tuple, list)):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("latin-1")
    return v


_HINTS: dict[type, tuple[dict[str, Any], frozenset[str]]] = {}


def _hints(tp: type) -> tuple[dict[str, Any], frozenset[str]]:
    # get_type_hints() evaluates string annotations: slow, so once per class (plans are decoded
    # on the launcher's per-run path).
    h = _HINTS.get(tp)
    if h is None:
        import typing
        h = (typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp)))
        _HINTS[tp] = h
    return h


def _from_jsonable(tp: Any, v: Any) -> Any:
    """Rebuild a dataclass tree from its JSON form, strictly: unknown keys are an error."""
    import typing

    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ValueError(f"{tp.__name__}: expected an object, got {type(v).__name__}")
        hints, names = _hints(tp)
        extra = set(v) - names
        if extra:
            raise ValueError(f"{tp.__name__}: unknown keys {sorted(extra)}")
        return tp(**{k: _from_jsonable(hints[k], x) for k, x in v.items()})
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], x) for x in v)
        return tuple(_from_jsonable(a, x) for a, x in zip(args, v))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _from_jsonable(non_none[0], v)
    if origin is list:
        return [_from_jsonable(args[0], x) for x in v]
    return v
