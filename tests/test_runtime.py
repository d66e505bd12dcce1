"""The runtime end to end on the real kernel: isolation, limits, verdicts, accounting.

Every test runs real programs in real sandboxes through one launcher (the `runtime` fixture),
exactly as the daemon does. Nothing here is mocked.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sandboxd import planner
from sandboxd.errors import SandboxError
from sandboxd.plan import Limits, Status
from tests.sandbox_helpers import PY, plan, sh, landlock_abi as _landlock_abi  # noqa: F401


# --- basics -------------------------------------------------------------------------------
def test_true_ok(runtime):
    r = runtime.run(plan(["/bin/true"]))
    assert r.status == Status.OK and r.exit_code == 0 and r.signal is None


def test_exit_code_is_runtime_error(runtime):
    r = runtime.run(sh("exit 3"))
    assert r.status == Status.RUNTIME_ERROR and r.exit_code == 3


def test_stdout_stderr_and_stdin_bytes(runtime):
    r = runtime.run(sh("cat; echo err >&2"), stdin=b"hello\n")
    assert r.stdout == b"hello\n" and r.stderr == b"err\n"


def test_stdin_from_file(runtime, tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes(b"from-file")
    r = runtime.run(plan(["/bin/cat"]), stdin=str(f))
    assert r.stdout == b"from-file"


def test_missing_program_is_a_sandbox_error_naming_execve(runtime):
    with pytest.raises(SandboxError) as ei:
        runtime.run(plan(["/no/such/program"]))
    assert ei.value.step == "execve" and ei.value.errno == 2


def test_signals_are_reported(runtime):
    r = runtime.run(sh("kill -SEGV $$"))
    assert r.status == Status.SIGNALED and r.signal == 11 and r.signal_name == "SIGSEGV"
    r = runtime.run(plan([PY, "-c", "import os; os.abort()"]))
    assert r.status == Status.SIGNALED and r.signal == 6


# --- isolation, attested and probed ---------------------------------------------------------
def test_attestation_reports_applied_controls(runtime):
    r = runtime.run(plan(["/bin/true"]))
    a = r.attestation
    for ns in ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup"):
        assert a["namespaces"][ns]["new"] is True, ns
    assert a["capabilities"] == {k: [] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert a["no_new_privs"] == 1
    assert a["seccomp"]["mode"] == 2 and a["seccomp"]["filters"] >= 1
    assert a["seccomp"]["bpf_sha256"]
    inside, host, count = a["uid_map"].split()
    assert inside == "1000" and int(host) >= 1000 and host != "0" and count == "1"
    assert a["identity"]["groups"] == []
    assert a["cgroup"]["memory_limit_bytes"] == 256 << 20 and a["cgroup"]["pids_max"] == 64  # read back
    assert a["rlimits"]["core"] == [0, 0] and a["rlimits"]["nofile"] == [256, 256]           # read back
    assert a["rlimits"]["fsize"] == [64 << 20, 64 << 20]


def test_identity_and_hostname(runtime):
    r = runtime.run(sh("id -u; id -g; hostname; cat /proc/self/uid_map"))
    lines = r.stdout.decode().split("\n")
    assert lines[0] == "1000" and lines[1] == "1000" and lines[2] == "sandbox"
    assert lines[3].split()[0] == "1000" and lines[3].split()[1] != "0"


def test_filesystem_layout(runtime):
    script = r"""
set -u
touch /newfile 2>/dev/null && echo root-writable
touch /usr/newfile 2>/dev/null && echo usr-writable
echo x > /box/f && echo box-ok
echo x > /tmp/f && echo tmp-ok
echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo procsys-writable
[ -s /proc/kcore ] && echo kcore-visible
[ -e /sys/kernel ] && echo sys-visible
[ -e /root ] && echo root-home-visible
[ -e /work ] && echo work-visible
for d in null zero full random urandom; do [ -c /dev/$d ] || echo missing-$d; done
for d in mem kmem kmsg sda vda port console tty0 net/tun fuse; do [ -e /dev/$d ] && echo extra-$d; done
"""
    r = runtime.run(sh(script))
    out = r.stdout.decode()
    assert "box-ok" in out and "tmp-ok" in out
    for bad in ("root-writable", "usr-writable", "procsys-writable", "kcore-visible", "sys-visible",
                "root-home-visible", "work-visible"):
        assert bad not in out, (bad, out)
    assert "missing-" not in out and "extra-" not in out, out


def test_tmpfs_size_is_capped(runtime):
    p = sh("dd if=/dev/zero of=/tmp/big bs=1M count=200 2>&1; echo rc=$?")
    p = dataclasses.replace(p, filesystem=dataclasses.replace(
        p.filesystem, tmpfs=tuple(dataclasses.replace(t, size_bytes=8 << 20) if t.target == "/tmp" else t
                                  for t in p.filesystem.tmpfs)))
    r = runtime.run(p)
    assert b"No space left on device" in r.stdout and b"rc=1" in r.stdout


def test_only_own_pids_visible(runtime):
    r = runtime.run(sh("ls /proc | grep -E '^[0-9]+$' | wc -l; echo $$"))
    n, me = r.stdout.decode().split()
    assert int(n) <= 5, r.stdout      # init, the shell, ls, grep, wc at most
    assert int(me) <= 3


def test_fds_are_not_leaked(runtime):
    r = runtime.run(sh("ls /proc/self/fd | tr '\\n' ' '"))
    assert set(r.stdout.decode().split()) <= {"0", "1", "2", "3"}  # 3: ls's own directory fd


@pytest.mark.parametrize("code", [
    "import ctypes; l=ctypes.CDLL(None,use_errno=True); r=l.mount(b'none',b'/tmp',b'tmpfs',0,None); print('mount', r, ctypes.get_errno())",
    "import ctypes; l=ctypes.CDLL(None,use_errno=True); r=l.unshare(0x10000000); print('unshare', r, ctypes.get_errno())",
    "import ctypes; l=ctypes.CDLL(None,use_errno=True); r=l.ptrace(16, 1, 0, 0); print('ptrace', r, ctypes.get_errno())",
    "import ctypes; l=ctypes.CDLL(None,use_errno=True); r=l.syscall(175, b'', 0, b''); print('init_module', r, ctypes.get_errno())",
])
def test_escape_syscalls_fail(runtime, code):
    r = runtime.run(plan([PY, "-c", code]))
    # Either the filter's errno (the default profile answers EPERM) or killed and reported.
    if r.status == Status.SYSCALL_DENIED:
        assert r.denied_syscalls
    else:
        name, rc, err = r.stdout.decode().split()
        assert rc == "-1" and int(err) != 0, r.stdout


def test_host_loopback_unreachable(runtime):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX)
    name = f"\0sandboxd-test-{os.getpid()}"
    abstract.bind(name)
    abstract.listen(1)
    try:
        code = (f"import socket\n"
                f"s=socket.socket()\n"
                f"try:\n s.connect(('127.0.0.1',{port})); print('tcp-reached')\n"
                f"except OSError as e: print('tcp', e.errno)\n"
                f"u=socket.socket(socket.AF_UNIX)\n"
                f"try:\n u.connect({name!r}); print('abstract-reached')\n"
                f"except OSError as e: print('abstract', e.errno)\n")
        # With every layer: Landlock refuses the TCP connect (EACCES) before the network is tried.
        r = runtime.run(plan([PY, "-c", code]))
        assert b"reached" not in r.stdout, r.stdout
        tcp = b"tcp 13" if _landlock_abi() >= 4 else b"tcp 111"   # Landlock TCP rules need ABI 4
        assert tcp in r.stdout and b"abstract 111" in r.stdout, r.stdout
        # The network namespace alone: the sandbox's own loopback has no listener (ECONNREFUSED),
        # and abstract unix sockets are per network namespace.
        p = plan([PY, "-c", code])
        p = dataclasses.replace(p, landlock=dataclasses.replace(p.landlock, enabled=False))
        r = runtime.run(p)
        assert b"reached" not in r.stdout, r.stdout
        assert b"tcp 111" in r.stdout and b"abstract 111" in r.stdout, r.stdout
    finally:
        srv.close()
        abstract.close()


# --- limits and verdicts --------------------------------------------------------------------
ALLOC = "b=bytearray({n}); [b.__setitem__(i,1) for i in range(0,len(b),4096)]; print('alive')"


def test_memory_limit_oom_kill(runtime):
    r = runtime.run(plan([PY, "-c", ALLOC.format(n=512 << 20)], memory_bytes=64 << 20))
    assert r.status == Status.MEMORY_LIMIT and r.oom_kills >= 1
    assert r.peak_memory_bytes >= 60 << 20
    assert b"alive" not in r.stdout


def test_memory_limit_when_only_a_child_is_killed(runtime):
    code = ALLOC.format(n=512 << 20)
    r = runtime.run(sh(f"{PY} -c \"{code}\"; echo parent-survived", memory_bytes=64 << 20))
    assert b"parent-survived" in r.stdout
    assert r.status == Status.MEMORY_LIMIT and r.oom_kills >= 1


def test_memory_within_limit_ok_and_peak_from_cgroup(runtime):
    r = runtime.run(plan([PY, "-c", ALLOC.format(n=32 << 20)], memory_bytes=128 << 20))
    assert r.status == Status.OK
    assert 32 << 20 <= r.peak_memory_bytes < 128 << 20


SPIN = "import time\nt=time.process_time()\nwhile time.process_time()-t<{s}: pass"


def test_cpu_time_0_9s_passes_under_1s(runtime):
    r = runtime.run(plan([PY, "-c", SPIN.format(s=0.9)], cpu_time_ms=1000))
    assert r.status == Status.OK, (r.status, r.cpu_time_ms)
    assert 850 <= r.cpu_time_ms <= 1000


def test_cpu_time_1_1s_fails_under_1s(runtime):
    r = runtime.run(plan([PY, "-c", SPIN.format(s=1.1)], cpu_time_ms=1000))
    assert r.status == Status.TIME_LIMIT and r.cpu_time_ms > 1000


def test_cpu_time_exact_under_machine_load(runtime):
    # Two host processes keep both CPUs busy: wall time stretches, CPU time must not.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        ok = runtime.run(plan([PY, "-c", SPIN.format(s=0.9)], cpu_time_ms=1000, wall_time_ms=20_000))
        over = runtime.run(plan([PY, "-c", SPIN.format(s=1.1)], cpu_time_ms=1000, wall_time_ms=20_000))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert ok.status == Status.OK and 850 <= ok.cpu_time_ms <= 1000, (ok.status, ok.cpu_time_ms, ok.wall_time_ms)
    assert over.status == Status.TIME_LIMIT, (over.status, over.cpu_time_ms)


def test_cpu_time_counts_all_processes(runtime):
    # Two spinning processes of 0.6 s each: 1.2 s of CPU in total, over a 1 s limit.
    code = SPIN.format(s=0.6)
    r = runtime.run(sh(f"{PY} -c '{code}' & {PY} -c '{code}'; wait", cpu_time_ms=1000, cpu_extra_ms=500))
    assert r.status == Status.TIME_LIMIT and r.cpu_time_ms > 1000


def test_cpu_extra_reports_real_use(runtime):
    r = runtime.run(plan([PY, "-c", SPIN.format(s=1.3)], cpu_time_ms=1000, cpu_extra_ms=1000))
    assert r.status == Status.TIME_LIMIT and 1250 <= r.cpu_time_ms <= 1500


def test_wall_time_limit(runtime):
    t = time.monotonic()
    r = runtime.run(plan(["/bin/sleep", "30"], wall_time_ms=500))
    assert r.status == Status.WALL_TIME_LIMIT and r.killed_by_sandbox
    assert time.monotonic() - t < 5


def test_background_child_dies_with_run(runtime):
    marker = f"sandboxd-bg-{os.getpid()}-{time.monotonic_ns()}"
    t = time.monotonic()
    # bash for `exec -a` (dash has none): the survivor would carry the marker as its argv[0].
    r = runtime.run(sh(f"setsid bash -c 'exec -a {marker} sleep 60' </dev/null >/dev/null 2>&1 & "
                       f"sleep 0.2; ps -eo args | grep -c '^{marker}'; echo started"))
    assert r.status == Status.OK and r.stdout == b"1\nstarted\n", r.stdout   # it did start
    assert time.monotonic() - t < 5
    time.sleep(0.2)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert marker.encode() not in f.read(), f"background child {pid} survived"
            except OSError:
                pass


def test_fork_bomb_ends_promptly(runtime):
    t = time.monotonic()
    r = runtime.run(sh("b() { b | b & }; b", pids=16, wall_time_ms=2000, cpu_time_ms=2000))
    assert time.monotonic() - t < 10
    assert r.status in (Status.WALL_TIME_LIMIT, Status.TIME_LIMIT, Status.OK, Status.RUNTIME_ERROR)
    # and the machine still runs sandboxes
    assert runtime.run(plan(["/bin/true"])).status == Status.OK


def test_pids_limit(runtime):
    code = ("import os\nn=0\ntry:\n while True:\n  if os.fork()==0:\n   import time; time.sleep(5); os._exit(0)\n  n+=1\n"
            "except OSError as e: print('stopped', n, e.errno)")
    r = runtime.run(plan([PY, "-c", code], pids=8, wall_time_ms=3000))
    assert b"stopped" in r.stdout
    n = int(r.stdout.split()[1])
    assert n <= 8


def test_output_limit(runtime):
    r = runtime.run(sh("yes", stdout_bytes=1 << 20, wall_time_ms=5000))
    assert r.status == Status.OUTPUT_LIMIT and r.stdout_truncated
    assert len(r.stdout) == 1 << 20


def test_file_size_limit(runtime):
    r = runtime.run(plan(["/bin/dd", "if=/dev/zero", "of=/box/f", "bs=1M", "count=20"], file_size_bytes=1 << 20))
    assert r.status == Status.OUTPUT_LIMIT and r.signal == 25  # SIGXFSZ


# --- seccomp, reported by name ----------------------------------------------------------------
def test_judge_kills_ptrace_and_names_it(runtime):
    code = "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('traced')"
    r = runtime.run(plan([PY, "-c", code], preset="judge"))
    assert r.status == Status.SYSCALL_DENIED and r.killed_by_sandbox
    assert [d.name for d in r.denied_syscalls] == ["ptrace"] and r.denied_syscalls[0].action == "kill"
    assert b"traced" not in r.stdout


def test_judge_socket_fails_without_a_network(runtime):
    # socket() answers EACCES (glibc's nscd lookups fall back on it); nothing can be connected.
    code = "import socket\ntry:\n socket.socket()\nexcept OSError as e: print(e.errno)"
    r = runtime.run(plan([PY, "-c", code], preset="judge"))
    assert r.status == Status.OK and r.stdout == b"13\n"


def test_default_profile_denial_reported_but_not_fatal(runtime):
    code = ("import ctypes; l=ctypes.CDLL(None,use_errno=True); "
            "r=l.syscall(246, 0, 0, 0); print('kexec_load', r, ctypes.get_errno())")
    r = runtime.run(plan([PY, "-c", code]))
    assert r.status == Status.OK
    assert b"kexec_load -1 1" in r.stdout            # EPERM from the filter
    assert any(d.name == "kexec_load" and d.action == "errno" for d in r.denied_syscalls)


def test_judge_runs_compiled_and_interpreted_programs(runtime):
    for argv in (["/bin/true"], [PY, "-c", "print(sum(range(10)))"], ["/bin/sh", "-c", "echo $((6*7))"]):
        r = runtime.run(plan(argv, preset="judge"))
        assert r.status == Status.OK, (argv, r.status, r.denied_syscalls, r.stderr)


# --- many runs --------------------------------------------------------------------------------
def test_twenty_concurrent_runs_are_isolated(runtime):
    results = [None] * 20

    def go(i):
        results[i] = runtime.run(sh("cat /proc/self/uid_map; sleep 3"))
    ts = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(r.status == Status.OK for r in results)
    host_uids = {r.stdout.split()[1] for r in results}
    assert len(host_uids) == 20     # each concurrent run had its own host uid


def _snapshot():
    # Runs mount only inside their own mount namespaces: nothing of theirs (the root tmpfs,
    # named "sandboxd", or anything at the root mountpoint) may ever show on the host. Other
    # tests on this machine may mount things of their own meanwhile; those are not compared.
    mounts = [m for m in open("/proc/self/mountinfo").read().splitlines()
              if "/run/sandboxd/root" in m or " - tmpfs sandboxd " in m]
    procs = {p for p in os.listdir("/proc") if p.isdigit()}
    return mounts, procs


def test_no_leaks_after_200_runs(runtime):
    from sandboxd.runtime import cgroups  # noqa: F401 - the leak check reads the instance's dirs
    mounts0, procs0 = _snapshot()
    cg_dirs0 = runtime.host_info()["cgroups"]
    kinds = [
        plan(["/bin/true"]),
        sh("exit 7"),
        plan(["/bin/sleep", "10"], wall_time_ms=50),
        sh("yes", stdout_bytes=4096),
        plan([PY, "-c", "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0)"], preset="judge"),
        sh("sleep 30 & echo x"),
    ]
    for i in range(200):
        try:
            runtime.run(kinds[i % len(kinds)])
        except SandboxError:
            pass
    with pytest.raises(SandboxError):
        runtime.run(plan(["/no/such"]))
    time.sleep(0.3)
    mounts1, procs1 = _snapshot()
    assert mounts1 == mounts0
    # No process of any run is left: run processes are the ones with a host uid from the
    # launcher's range (other tests on this machine may run their own processes meanwhile).
    start, count = runtime.host_info()["userns"]["range"]
    for p in procs1:
        try:
            uid = int(open(f"/proc/{p}/status").read().split("\nUid:")[1].split()[1])
        except (OSError, IndexError):
            continue
        if start <= uid < start + count and not _is_spare(p):
            try:
                what = open(f"/proc/{p}/cmdline", "rb").read(), open(f"/proc/{p}/stat").read()
            except OSError:
                continue   # it was exiting
            pytest.fail(f"pid {p} (uid {uid}) outlived its run: {what}")
    # What is left are the spares' cgroups (a spare waits in its own): at most `prefork`
    # built for recent layouts plus one generic, each holding only a waiting spare.
    left = _run_cgroups(cg_dirs0)
    assert len({name for _, name in left}) <= 3, left
    for base, name in left:
        for pid in open(os.path.join(base, name, "cgroup.procs")).read().split():
            assert _is_spare(pid), (base, name, pid)


def _is_spare(pid: str) -> bool:
    """Spare supervisors' init and workload processes wait, mapped, for the next run: forks
    of the launcher (its command line) and the exec stub a staged workload waits in (a stub
    that got its run has exec'd the program or exited)."""
    try:
        cmd = open(f"/proc/{pid}/cmdline").read()
        return "sandboxd.runtime.launcher" in cmd or cmd.startswith("sbx-exec\0")
    except OSError:
        return True   # gone meanwhile


def _run_cgroups(info) -> list[tuple[str, str]]:
    out = []
    for base in info["instance_dirs"]:
        if os.path.isdir(base):
            out += [(base, d) for d in os.listdir(base) if d.startswith("run-")]
    return out


# --- AppArmor: required never silently downgraded ---------------------------------------------
def test_apparmor_required_is_applied_or_refused_never_downgraded(runtime):
    from sandboxd.plan import AppArmorPlan
    from sandboxd.errors import HostCapabilityError
    p = plan(["/bin/true"])
    required = dataclasses.replace(p, apparmor=AppArmorPlan(profile="sandboxd-judge", required=True))
    if runtime.host_info()["apparmor"]["enabled"]:      # the VM tier: applied and read back
        r = runtime.run(required)
        assert r.status == Status.OK, (r.status, r.stderr)
        assert r.attestation["apparmor"]["applied"] is True
        assert r.attestation["apparmor"].get("verified") in (True, False)
        return
    with pytest.raises(HostCapabilityError) as ei:     # this host: refused, with the reason
        runtime.run(required)
    assert ei.value.step == "apparmor" and "is required, but this host cannot apply it" in str(ei.value)
    r = runtime.run(dataclasses.replace(p, apparmor=AppArmorPlan(profile="sandboxd-judge", required=False)))
    assert r.status == Status.OK
    assert r.attestation["apparmor"]["applied"] is False
    assert r.attestation["apparmor"]["reason"] == "not applied (host lacks AppArmor)"
