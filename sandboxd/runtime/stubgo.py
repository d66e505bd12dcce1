"""The exec stub (stub/sbx-exec.c): where it is, and the two inputs the launcher makes for it.

The layout blob (encode_layout, once per layout): what the run's init (`sbx-exec init`) builds
the sandbox from ahead of any run: the root's ops, the identity, the kept capabilities, the
Landlock rules. The GO frame (encode, per run): what the waiting workload does at the run:
rlimits, the seccomp program, argv[0]'s Landlock rule, the AppArmor exec attribute, argv and
envp. Both are pure computation, unit-tested without a kernel; the stub parses them with bounds
checks and answers a malformed one with ERROR (step "init" or "stub").
"""

from __future__ import annotations

import os
import resource
import struct
from typing import Any

from sandboxd.errors import HostCapabilityError
from sandboxd.plan import Plan

STUB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stub", "sbx-exec")
RULESET_FD = 4           # where the Landlock ruleset sits for the workload (sbx-exec.c: build_main)
STATUS_FD = 5            # where init (pid 1) writes the workload's wait status

MAGIC = 0x31584253       # "SBX1"
F_SECCOMP = 1
F_LANDLOCK = 2
F_LANDLOCK_EXEC_RULE = 4
F_APPARMOR = 8
_HEADER = struct.Struct("=IIIIIIIIQ")
_RLIMIT = struct.Struct("=IIQQ")
MAX_GO = 1 << 18         # the stub's receive buffer
DEFAULT_PATH = "/usr/bin:/bin"


def open_stub(path: str | None = None) -> int:
    """An O_PATH fd of the stub, opened once by the launcher and inherited by every spare (the
    run's init execs it by fd: after pivot_root no host path leads to it)."""
    path = path or STUB_PATH
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise HostCapabilityError("the runtime's exec stub is missing", step="launcher", path=path,
                                  errno=e.errno, hint="run scripts/build_stub.sh (scripts/setup.sh does)") from None
    st = os.fstat(fd)
    if not st.st_mode & 0o111:
        os.close(fd)
        raise HostCapabilityError("the runtime's exec stub is not executable", step="launcher",
                                  path=path, hint="run scripts/build_stub.sh --force")
    return fd


def rlimits(plan: Plan) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for every rlimit a run sets, explicitly: nothing is inherited from
    the launcher."""
    lim = plan.limits
    items = [
        (resource.RLIMIT_CORE, 0),                 # no core files: they leak memory contents and fill disks
        (resource.RLIMIT_STACK, lim.stack_bytes),
        (resource.RLIMIT_FSIZE, lim.file_size_bytes),
        (resource.RLIMIT_NOFILE, lim.open_files),
        # No locked memory beyond a page-pinning default, no real-time priority, no nice
        # boosts, bounded message queues and pending signals.
        (resource.RLIMIT_MEMLOCK, 64 << 10),
        (resource.RLIMIT_RTPRIO, 0),
        (resource.RLIMIT_NICE, 0),
        (resource.RLIMIT_MSGQUEUE, 800 << 10),
        (resource.RLIMIT_SIGPENDING, 4096),
    ]
    out = [(res, val, val) for res, val in items]
    if lim.cpu_time_ms is not None:
        # Backstop per process; the cgroup is the real CPU clock. SIGXCPU at soft, SIGKILL at hard.
        soft = (lim.cpu_time_ms + lim.cpu_extra_ms) // 1000 + 1
        out.append((resource.RLIMIT_CPU, soft, soft + 1))
    if lim.address_space_bytes is not None:
        out.append((resource.RLIMIT_AS, lim.address_space_bytes, lim.address_space_bytes))
    return out


def encode(plan: Plan, *, bpf: bytes | None, seccomp_flags: int, landlock: bool,
           exec_rule: tuple[str, int] | None, apparmor: Any = None) -> bytes:
    """The GO frame for `plan`. `exec_rule`: (path, access) of argv[0]'s Landlock rule, or None.
    `apparmor`: an apparmor.ExecTransition, or None."""
    flags = 0
    if bpf is not None:
        flags |= F_SECCOMP
    if landlock:
        flags |= F_LANDLOCK
        if exec_rule is not None:
            flags |= F_LANDLOCK_EXEC_RULE
    if apparmor is not None:
        flags |= F_APPARMOR
    env = dict(plan.env)
    strings = [env.get("PATH", DEFAULT_PATH),
               exec_rule[0] if exec_rule else "",
               apparmor.attr_path if apparmor is not None else "",
               apparmor.data.decode() if apparmor is not None else ""]
    strings += list(plan.argv)
    strings += [f"{k}={v}" for k, v in plan.env]
    rl = rlimits(plan)
    bpf = bpf or b""
    parts = [_HEADER.pack(MAGIC, flags, len(rl), seccomp_flags if bpf else 0, len(bpf),
                          len(plan.argv), len(plan.env), 0, exec_rule[1] if exec_rule else 0)]
    parts += [_RLIMIT.pack(res, 0, _u64(soft), _u64(hard)) for res, soft, hard in rl]
    parts.append(bpf)
    parts.append(b"".join(s.encode() + b"\0" for s in strings))
    frame = b"".join(parts)
    if len(frame) > MAX_GO:
        from sandboxd.errors import PlanError
        raise PlanError(f"argv and environment too large ({len(frame)} bytes encoded, at most {MAX_GO})",
                        step="plan")
    return frame


def _u64(v: int) -> int:
    """Python's RLIM_INFINITY is -1; the kernel's is all ones."""
    return resource.RLIM_INFINITY & 0xFFFFFFFFFFFFFFFF if v < 0 else v


LAYOUT_MAGIC = "SBXL1"
MAX_LAYOUT = 1 << 17     # the stub's buffer for the LAYOUT frame, its kind byte included


def encode_layout(*, root: str, hostname: str, cwd: str, uid: int, gid: int, keep_caps: int,
                  cpu_arg: str, landlock: Any, ops: list[tuple]) -> bytes:
    """The blob the run's init (sbx-exec init, build_main) builds the sandbox from: made once per
    layout by the launcher. `landlock`: a landlock.Prepared whose ruleset init builds, or None;
    `ops`: mounts.compile_root's. Strings, numbers in decimal, each NUL-terminated."""
    out: list[str | int] = [LAYOUT_MAGIC, root, hostname, cwd, uid, gid, keep_caps, cpu_arg or "-",
                            len(ops)]
    for op in ops:
        out.extend(op)
    # Last, as init reads it: the ruleset is built after no_new_privs.
    if landlock is None or landlock.attr is None:
        out.append(0)
    else:
        a = landlock.attr
        out += [1, landlock.attr_size, a.handled_access_fs, a.handled_access_net, a.scoped,
                len(landlock.paths)]
        for e in landlock.paths:
            out += [e.display, e.dir_access, e.file_access, int(e.optional)]
        out.append(len(landlock.ports))
        for p in landlock.ports:
            out += [p.port, p.allowed_access]
    parts = []
    for v in out:
        s = str(v) if isinstance(v, int) else v
        if "\0" in s:
            from sandboxd.errors import PlanError
            raise PlanError(f"layout string holds a NUL byte: {s[:40]!r}", step="plan")
        parts.append(s.encode() + b"\0")
    blob = b"".join(parts)
    if len(blob) + 1 > MAX_LAYOUT:
        from sandboxd.errors import PlanError
        raise PlanError(f"sandbox layout too large ({len(blob)} bytes encoded, at most {MAX_LAYOUT - 1})",
                        step="plan")
    return blob
