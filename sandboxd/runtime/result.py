"""From what a run's processes and its cgroup report to the Result: verdict, numbers, attestation.

Pure functions over plain values, so the supervisor (which delivers the result of a run that
went normally, straight to the client) and the launcher (which answers for runs that failed or
whose supervisor died) compute the same thing, and unit tests need no kernel.
"""

from __future__ import annotations

import os
import signal
import time

from sandboxd.errors import LaunchError
from sandboxd.plan import DeniedSyscall, Plan, Result, Status
from sandboxd.runtime import caps


def build(plan: Plan, rep: dict, numbers: dict, base: dict, attestation: dict | None = None) -> Result:
    """The Result of a run that reached execve.

    rep: the supervisor's report (workload wait status, kill reason, times, denials, what the
    kernel said of the workload); numbers: read from the cgroup once nothing of the run can run
    any more ({"cpu_ns", "peak", "ooms"}); base: the launcher's part of the attestation
    (ids, host namespaces, what each control resolved to, cgroup read-back); attestation:
    attest() made earlier from the same report (the supervisor parses it while the program
    runs), completed here with what can change until the end."""
    w = rep.get("workload") or {}
    cpu_ms = max(0, numbers["cpu_ns"] - (rep.get("cpu_base_ns") or 0)) / 1e6
    t_exit = w.get("t_exit_ns")
    wall_ms = ((t_exit or rep.get("t_end_ns") or time.monotonic_ns()) - rep["t_exec_ns"]) / 1e6
    exit_code = sig = None
    ws = w.get("wait_status")
    if ws is not None:
        if os.WIFEXITED(ws):
            exit_code = os.WEXITSTATUS(ws)
        elif os.WIFSIGNALED(ws):
            sig = os.WTERMSIG(ws)
        else:
            # A stop or anything else is no end: never let it become a verdict (it would be OK).
            raise LaunchError(f"init reported wait status {ws:#x}, neither an exit nor a signal",
                              step="collect")
    else:
        sig = signal.SIGKILL  # init was killed: the workload died with the namespace
    reason = rep.get("kill_reason")
    res = Result(status=Status.OK, exit_code=exit_code, signal=sig, cpu_time_ms=round(cpu_ms, 3),
                 wall_time_ms=round(max(0.0, wall_ms), 3), peak_memory_bytes=numbers["peak"],
                 oom_kills=numbers["ooms"], killed_by_sandbox=reason is not None, kill_reason=reason)
    res.stdout_truncated = rep["truncated"]["stdout"]
    res.stderr_truncated = rep["truncated"]["stderr"]
    res.denied_syscalls = [DeniedSyscall(name=n, count=c, action=a)
                           for n, (c, a) in sorted(rep.get("denials", {}).items())]
    res.status = decide_status(plan, res, reason, rep.get("cancelled", False))
    if attestation is None:
        res.attestation = attest(plan, rep, base)
    else:
        att = rep.get("attestation") or {}
        res.attestation = attestation
        attestation["seccomp"]["denial_flood"] = att.get("denial_flood")
        attestation["apparmor"].update(att.get("apparmor") or {})
    return res


def attest(plan: Plan, rep: dict, base: dict) -> dict:
    """The controls actually applied, as the kernel reported them (read back, not taken from
    the plan): /proc/self/status and /proc/self/limits read by the stub after its last step,
    /proc/<pid>/status read from outside when the supervisor got there in time."""
    att = rep.get("attestation") or {}
    inside = caps.read_status_caps(att.get("status", ""))
    outside = caps.read_status_caps(att.get("status_outside", ""), only=("Seccomp",)) or inside
    ns = att.get("ns") or {}
    host_ns = base.get("host_ns", {})
    return {
        "namespaces": {k: {"id": v, "new": v != host_ns.get(k)} for k, v in ns.items()},
        "uid_map": base.get("uid_map"), "gid_map": base.get("gid_map"),
        "id_mapping": base.get("id_mapping"),
        "identity": {"uid": inside.get("Uid"), "gid": inside.get("Gid"), "groups": inside.get("Groups")},
        "capabilities": {k: inside.get(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": inside.get("NoNewPrivs"),
        "seccomp": dict(base.get("seccomp", {}), mode=inside.get("Seccomp"),
                        filters=inside.get("Seccomp_filters"),
                        mode_outside=outside.get("Seccomp"),
                        denial_flood=att.get("denial_flood")),
        "landlock": dict(base.get("landlock") or {}, applied=att.get("landlock")),
        "apparmor": dict(base.get("apparmor", {}), **(att.get("apparmor") or {}),
                         host_enabled=base.get("apparmor_host_enabled")),
        "cgroup": dict(base.get("cgroup", {})),
        "rlimits": parse_proc_limits(att.get("limits", "")),
        "network": base.get("network") or {"mode": plan.network.mode},
        "spare": base.get("spare") or {},
    }


def decide_status(plan: Plan, res: Result, reason: str | None, cancelled: bool) -> Status:
    """The verdict, in precedence order. A pure function: unit-tested without a kernel."""
    lim = plan.limits
    if cancelled or reason == "CANCELLED":
        return Status.CANCELLED
    if reason == "SYSCALL_DENIED":
        return Status.SYSCALL_DENIED
    if reason == "OUTPUT_LIMIT" or res.signal == signal.SIGXFSZ:
        return Status.OUTPUT_LIMIT
    # SIGXCPU counts only when the CPU really reached the rlimit backstop (whole seconds past
    # the limit): a program can send itself SIGXCPU, and that is SIGNALED, not a time verdict.
    xcpu = res.signal == signal.SIGXCPU and lim.cpu_time_ms is not None and \
        res.cpu_time_ms >= ((lim.cpu_time_ms + lim.cpu_extra_ms) // 1000 + 1) * 1000 * 0.95
    if lim.cpu_time_ms is not None and (res.cpu_time_ms > lim.cpu_time_ms or reason == "TIME_LIMIT" or xcpu):
        return Status.TIME_LIMIT
    if reason == "WALL_TIME_LIMIT":
        return Status.WALL_TIME_LIMIT
    if res.oom_kills > 0:
        return Status.MEMORY_LIMIT
    if res.signal is not None:
        return Status.SIGNALED
    if res.exit_code:
        return Status.RUNTIME_ERROR
    return Status.OK


_LIMIT_NAMES = {"Max cpu time": "cpu", "Max file size": "fsize", "Max stack size": "stack",
                "Max core file size": "core", "Max open files": "nofile", "Max address space": "as",
                "Max processes": "nproc"}


def parse_proc_limits(text: str) -> dict:
    """/proc/<pid>/limits as the workload saw it just before execve -> {name: [soft, hard]}
    (None: unlimited). Read back, not taken from the plan."""
    out: dict[str, list] = {}
    for line in text.splitlines()[1:]:
        # The kernel pads the name to 25 columns ("%-25s %-20s %-20s %-10s"): the name ends at
        # the first double space (no name has one).
        label, _, rest = line.partition("  ")
        key = _LIMIT_NAMES.get(label)
        if key is not None:
            parts = rest.split()
            out[key] = [None if v == "unlimited" else int(v) for v in parts[:2]]
    return out
