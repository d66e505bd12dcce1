"""Pure decisions, no kernel: plan JSON round trip, verdict precedence, parsers, errors."""

from __future__ import annotations

import signal

import pytest

from sandboxd import planner
from sandboxd.cli import parse_duration_ms, parse_size
from sandboxd.errors import LaunchError, PlanError, SandboxError
from sandboxd.plan import Limits, Plan, Result, Status
from sandboxd.runtime import caps
from sandboxd.runtime.launcher import IdPool
from sandboxd.runtime.result import decide_status, parse_proc_limits


def test_plan_json_round_trip_is_exact():
    p = planner.build_plan(["/bin/true"], preset="judge")
    assert Plan.from_json(p.to_json()) == p


def test_plan_rejects_unknown_keys():
    d = planner.build_plan(["/bin/true"]).to_dict()
    d["limits"]["cpu_tme_ms"] = 5
    with pytest.raises(ValueError, match=r"Limits: unknown keys \['cpu_tme_ms'\]"):
        Plan.from_dict(d)


def _res(**kw):
    base = dict(status=Status.OK, exit_code=0, signal=None, cpu_time_ms=10.0)
    base.update(kw)
    return Result(**base)


P = Plan(argv=("x",), limits=Limits(cpu_time_ms=1000))


@pytest.mark.parametrize("res,reason,cancelled,want", [
    (_res(), None, False, Status.OK),
    (_res(exit_code=3), None, False, Status.RUNTIME_ERROR),
    (_res(exit_code=None, signal=11), None, False, Status.SIGNALED),
    (_res(cpu_time_ms=1000.5), None, False, Status.TIME_LIMIT),        # exited, but over the limit
    (_res(exit_code=None, signal=signal.SIGXCPU, cpu_time_ms=1990.0), None, False, Status.TIME_LIMIT),
    (_res(exit_code=None, signal=signal.SIGXCPU), None, False, Status.SIGNALED),  # self-sent: not a verdict
    (_res(exit_code=None, signal=9), "WALL_TIME_LIMIT", False, Status.WALL_TIME_LIMIT),
    (_res(oom_kills=1), None, False, Status.MEMORY_LIMIT),             # only a child was killed
    (_res(exit_code=None, signal=signal.SIGXFSZ), None, False, Status.OUTPUT_LIMIT),
    (_res(exit_code=None, signal=9), "OUTPUT_LIMIT", False, Status.OUTPUT_LIMIT),
    (_res(exit_code=None, signal=9, oom_kills=1), "SYSCALL_DENIED", False, Status.SYSCALL_DENIED),
    (_res(exit_code=None, signal=9), "CANCELLED", True, Status.CANCELLED),
])
def test_verdict_precedence(res, reason, cancelled, want):
    assert decide_status(P, res, reason, cancelled) == want


def test_sizes_and_durations():
    assert parse_size("256MiB") == 256 << 20 and parse_size("1g") == 1 << 30 and parse_size("4096") == 4096
    assert parse_duration_ms("2s") == 2000 and parse_duration_ms("500ms") == 500 and parse_duration_ms("1.5") == 1500


def test_unknown_capability_fails_closed():
    with pytest.raises(PlanError, match="unknown capability name"):
        caps.parse_caps(["CAP_NET_BIND_SERVICE", "CAP_FLY"])
    assert caps.parse_caps(["net_bind_service"]) == 1 << 10


def test_error_names_step_object_errno_and_hint():
    e = LaunchError("bind source missing", step="bind_mount", path="/nope", errno=2, hint="create it")
    assert str(e) == "bind_mount: bind source missing [/nope] (ENOENT: No such file or directory); hint: create it"
    assert SandboxError.from_dict(e.to_dict()).to_dict() == e.to_dict()


def test_id_pool_hands_out_distinct_ids():
    pool = IdPool(100, 3)
    got = {pool.acquire() for _ in range(3)}
    assert got == {100, 101, 102}
    with pytest.raises(SandboxError, match="no free host uid"):
        pool.acquire()
    pool.release(101)
    assert pool.acquire() == 101


def test_proc_limits_parser():
    text = ("Limit                     Soft Limit           Hard Limit           Units     \n"
            "Max cpu time              3                    4                    seconds   \n"
            "Max file size             1048576              1048576              bytes     \n"
            "Max core file size        0                    0                    bytes     \n"
            "Max address space         unlimited            unlimited            bytes     \n")
    assert parse_proc_limits(text) == {"cpu": [3, 4], "fsize": [1048576, 1048576], "core": [0, 0],
                                       "as": [None, None]}


def test_bind_spec_validation(tmp_path):
    b = planner.parse_bind(f"{tmp_path}:/box/in", writable=False)
    assert b.source == str(tmp_path) and b.target == "/box/in" and not b.writable
    with pytest.raises(PlanError):
        planner.parse_bind(f"{tmp_path}:box/in", writable=False)
    with pytest.raises(PlanError):
        planner.parse_bind(f"{tmp_path}:/box/../etc", writable=False)
    with pytest.raises(PlanError):
        planner.parse_bind("/does/not/exist:/x", writable=False)


def test_result_build_with_an_attestation_parsed_early_equals_parsing_at_the_end():
    """The supervisor parses the stub's read-back while the program runs; what can change later
    (a denial flood, AppArmor's read-back after execve) is patched in at the end."""
    from sandboxd import planner
    from sandboxd.runtime import result
    p = planner.build_plan(["/bin/true"])
    status = "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
    early = {"status": status, "limits": "Limit  Soft Limit  Hard Limit  Units\nMax core file size  0  0  bytes\n",
             "ns": {"pid": "pid:[1]"}, "landlock": {"path_rules": 3}}
    base = {"host_ns": {"pid": "pid:[9]"}, "seccomp": {"profile": "default"}, "apparmor": {"profile": "x"},
            "cgroup": {"pids_max": 64}}
    pre = result.attest(p, {"attestation": dict(early)}, base)
    late = dict(early, denial_flood=20001, apparmor={"verified": True, "label": "x (enforce)"})
    rep = {"workload": {"wait_status": 0, "t_exit_ns": 2_000_000}, "t_exec_ns": 1_000_000,
           "cpu_base_ns": 0, "truncated": {"stdout": False, "stderr": False}, "denials": {},
           "attestation": late}
    numbers = {"cpu_ns": 500_000, "peak": 1 << 20, "ooms": 0}
    a = result.build(p, rep, numbers, base, attestation=pre)
    b = result.build(p, rep, numbers, base)
    assert a.to_dict() == b.to_dict()
    assert a.attestation["seccomp"]["denial_flood"] == 20001 and a.attestation["apparmor"]["verified"]
    assert a.attestation["rlimits"]["core"] == [0, 0] and a.wall_time_ms == 1.0


@pytest.mark.parametrize("ws, want", [(3 << 8, ("exit", 3)), (11, ("signal", 11)),
                                      ((11 << 8) | 0x7F, None), (0xFFFF, None)])
def test_result_build_takes_only_an_exit_or_a_signal_as_the_end(ws, want):
    """A stopped child's status (a traced workload stops, reported to init) is no end: it is a
    sandbox error, never a verdict (it would have been OK with no exit code)."""
    from sandboxd import planner
    from sandboxd.errors import LaunchError
    from sandboxd.runtime import result
    p = planner.build_plan(["/bin/true"])
    rep = {"workload": {"wait_status": ws, "t_exit_ns": 2_000_000}, "t_exec_ns": 1_000_000,
           "cpu_base_ns": 0, "truncated": {"stdout": False, "stderr": False}, "denials": {},
           "attestation": {}}
    numbers = {"cpu_ns": 0, "peak": 0, "ooms": 0}
    base = {"seccomp": {}, "apparmor": {}, "cgroup": {}}
    if want is None:
        with pytest.raises(LaunchError, match="neither an exit nor a signal"):
            result.build(p, rep, numbers, base)
        return
    r = result.build(p, rep, numbers, base)
    assert (r.exit_code, r.signal) == ((want[1], None) if want[0] == "exit" else (None, want[1]))


def test_status_and_limits_parsers_match_a_plain_reading_of_this_process():
    """The attestation's parsers (tuned: they run once per run on the way to the result) read
    what a plain line-by-line reading of the same /proc files reads."""
    import random
    from sandboxd.runtime import caps
    for mask in [0, 1, 1 << 40, (1 << 41) - 1, 1 << 63] + [random.getrandbits(64) for _ in range(50)]:
        want = [caps.CAP_NAMES[i] if i < len(caps.CAP_NAMES) else f"CAP_{i}" for i in range(64) if mask >> i & 1]
        assert caps.mask_names(mask) == want
    status = open("/proc/self/status").read()
    plain = {}
    for line in status.splitlines():
        k, _, v = line.partition(":")
        if k.startswith("Cap"):
            plain[k] = caps.mask_names(int(v, 16))
        elif k in ("NoNewPrivs", "Seccomp", "Seccomp_filters"):
            plain[k] = int(v)
        elif k in ("Uid", "Gid", "Groups"):
            plain[k] = [int(x) for x in v.split()]
    assert caps.read_status_caps(status) == plain
    assert caps.read_status_caps(status, only=("Seccomp",)) == {"Seccomp": plain["Seccomp"]}
    limits = open("/proc/self/limits").read()
    got = parse_proc_limits(limits)
    assert set(got) == {"cpu", "fsize", "stack", "core", "nofile", "as", "nproc"}
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert got["nofile"] == [soft, hard]
    soft, _ = resource.getrlimit(resource.RLIMIT_CORE)
    assert got["core"][0] == (None if soft == resource.RLIM_INFINITY else soft)
