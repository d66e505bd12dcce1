"""Attacker's view of processes: see, signal or trace what is not its own, outlive the run,
reach another run. Real workloads in real sandboxes; host processes are real too."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time

import pytest

from sandboxd import planner
from sandboxd.plan import Limits, Status
from tests.sandbox_helpers import PY, plan, py, sh, bare  # noqa: F401


LAYERS = {"all": lambda p: p, "bare": bare}


def _procs_with(needle: bytes) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def _procs_of_uid(uid: int) -> list[int]:
    """Processes running as host uid `uid`, except sandboxd's own (a spare's init reuses a freed
    uid at once: its command line is the launcher's)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if uid in [int(x) for x in line.split()[1:]]:
                                with open(f"/proc/{pid}/cmdline", "rb") as c:
                                    if b"sandboxd.runtime.launcher" not in c.read():
                                        out.append(int(pid))
                            break
            except OSError:
                pass
    return out


def _run_bg(runtime, p, out: dict, key: str, **kw) -> threading.Thread:
    def go():
        try:
            out[key] = runtime.run(p, **kw)
        except Exception as e:  # noqa: BLE001 - reported by the asserting thread
            out[key] = e
    t = threading.Thread(target=go)
    t.start()
    return t


TRACE_INIT = r"""
import ctypes, os, signal
l = ctypes.CDLL(None, use_errno=True)
l.syscall.restype = ctypes.c_long
l.ptrace.restype = ctypes.c_long
def t(name, r):
    print(name, r, ctypes.get_errno() if r < 0 else 0, flush=True)
t("attach", l.ptrace(16, 1, 0, 0))                 # PTRACE_ATTACH
t("seize", l.ptrace(0x4206, 1, 0, 0))              # PTRACE_SEIZE
buf = ctypes.create_string_buffer(16)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 16)
riov = (ctypes.c_void_p * 2)(0x400000, 16)
t("vm_readv", l.syscall(310, 1, iov, 1, riov, 1, 0))
pfd = l.syscall(434, 1, 0)                         # pidfd_open(1)
t("pidfd_open", pfd)
if pfd >= 0:
    t("pidfd_getfd", l.syscall(438, pfd, 0, 0))    # init's fd 0: the launcher's stdio
for s in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGSEGV):
    try:
        os.kill(1, s)
        print("kill1", s, "sent", flush=True)
    except OSError as e:
        print("kill1", s, "errno", e.errno, flush=True)
import time; time.sleep(0.2)
print("alive-after", flush=True)
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_init_cannot_be_traced_or_killed(runtime, layer):
    r = runtime.run(LAYERS[layer](py(TRACE_INIT)))
    out = r.stdout.decode()
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if not ln.startswith("kill1")}
    for name in ("attach", "seize", "vm_readv"):
        assert lines[name][1] == "-1", out
    if lines["pidfd_open"][1] != "-1":
        assert lines["pidfd_getfd"][1] == "-1", out
    # SIGTERM is forwarded to the workload by design (a run can be asked to stop); with it
    # the workload dies, otherwise init ignores what it has no handler for.
    assert r.status in (Status.OK, Status.SIGNALED), (r.status, out, r.stderr)
    if r.status == Status.SIGNALED:
        assert r.signal == 15 and "kill1 19 sent" in out, (r.signal, out)


SWEEP = r"""
import os, signal, sys, time
me = os.getpid()
seen = []
t0 = time.process_time()
# A run's pid namespace numbers from 1 and never holds more than pids.max processes; 64 Ki
# numbers are far more than it can reach (pid_max itself is host-wide and may be 4 Mi).
for pid in range(2, min(65536, int(open("/proc/sys/kernel/pid_max").read()))):
    if pid % 4096 == 0:
        print(pid, round(time.process_time() - t0, 3), file=sys.stderr, flush=True)
    if pid == me:
        continue
    try:
        os.kill(pid, signal.SIGKILL)
        seen.append(pid)
    except ProcessLookupError:
        pass
    except PermissionError:
        seen.append(-pid)
print("killed", len(seen), seen[:10], flush=True)
try:
    os.kill(-1, signal.SIGKILL)                    # ESRCH: nothing else it may signal exists
except ProcessLookupError:
    pass
print("done", flush=True)
"""


def test_kill_sweep_reaches_nothing_outside(runtime):
    """SIGKILL every pid number and kill(-1): a host process and a concurrent run survive."""
    canary = subprocess.Popen(["sleep", "60"])
    victim = {}
    try:
        t = _run_bg(runtime, sh("sleep 3; echo victim-alive"), victim, "r")
        time.sleep(0.5)
        r = runtime.run(py(SWEEP))
        assert r.status == Status.OK, (r.status, r.stdout, r.stderr, r.cpu_time_ms, r.wall_time_ms,
                                       r.kill_reason, r.signal, r.exit_code)
        assert b"done" in r.stdout
        killed = r.stdout.split(b"killed ")[1].split()[0]
        assert int(killed) <= 2, r.stdout                # at most the interpreter's own pid ns kin
        t.join(30)
        v = victim["r"]
        assert not isinstance(v, Exception), v
        assert v.status == Status.OK and v.stdout == b"victim-alive\n", (v.status, v.stdout)
        assert canary.poll() is None, "host process killed from inside a sandbox"
    finally:
        canary.kill()
        canary.wait()


SURVIVORS = r"""
M={m}
# 1. double fork, new session, every catchable signal ignored
(trap '' HUP INT QUIT TERM USR1 USR2 PIPE ALRM CHLD TSTP TTIN TTOU; setsid bash -c "exec -a $M-ignorer sleep 60" & ) </dev/null >/dev/null 2>&1
# 2. a process that stops itself
(setsid bash -c "exec -a $M-stopped bash -c 'kill -STOP \$\$; sleep 60'" &) </dev/null >/dev/null 2>&1
# 3. a process busy in a denied syscall (seccomp notification) when the run ends
#    (paced: an unpaced loop is ended as a denial flood, see test_escape_launcher)
(setsid python3 -c "import ctypes, time
l=ctypes.CDLL(None)
while True: l.syscall(246,0,0,0); time.sleep(0.0005)" $M-notify &) </dev/null >/dev/null 2>&1
# 4. a process in its own process group, holding stdout
(exec -a $M-holder sleep 60 &)
sleep 0.5
echo started
sleep 0.5
"""


def test_nothing_outlives_the_run(runtime):
    marker = f"sbxesc{os.getpid()}x{time.monotonic_ns()}"
    seen_live = []

    def on_out(name, chunk):
        if b"started" in chunk:                  # control: the survivors did start
            seen_live.extend(_procs_with(marker.encode()))
    t0 = time.monotonic()
    r = runtime.run(plan(["/usr/bin/bash", "-c", SURVIVORS.format(m=marker)]), on_output=on_out)
    assert r.status == Status.OK, (r.status, r.stdout, r.stderr)
    assert len(seen_live) >= 4, seen_live
    assert time.monotonic() - t0 < 8                    # the holder of stdout did not keep the run
    host_uid = int(r.attestation["uid_map"].split()[1])
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (_procs_with(marker.encode()) or _procs_of_uid(host_uid)):
        time.sleep(0.05)
    assert _procs_with(marker.encode()) == []
    assert _procs_of_uid(host_uid) == []


NEIGHBOUR_A = r"""
import ctypes, os, socket, sys, time
l = ctypes.CDLL(None, use_errno=True)
open("/tmp/{m}", "w").write("a")
open("/dev/shm/{m}", "w").write("a")
shm = l.shmget(0x5a5a{k:04x}, 4096, 0o1666)         # IPC_CREAT|0666
s = socket.socket(socket.AF_UNIX); s.bind("\0{m}"); s.listen(1)
srv = socket.socket(); srv.bind(("127.0.0.1", 47000 + {k})); srv.listen(1)
print("ready", shm, flush=True)
time.sleep(3)
print("a-done", flush=True)
"""

NEIGHBOUR_B = r"""
import ctypes, os, socket, json
l = ctypes.CDLL(None, use_errno=True)
out = {{}}
out["tmp"] = os.path.exists("/tmp/{m}")
out["shm"] = os.path.exists("/dev/shm/{m}")
out["sysv"] = l.shmget(0x5a5a{k:04x}, 0, 0)
u = socket.socket(socket.AF_UNIX)
try:
    u.connect("\0{m}"); out["abstract"] = "CONNECTED"
except OSError as e:
    out["abstract"] = e.errno
t = socket.socket()
try:
    t.connect(("127.0.0.1", 47000 + {k})); out["tcp"] = "CONNECTED"
except OSError as e:
    out["tcp"] = e.errno
out["procs"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["unix"] = "{m}" in open("/proc/net/unix").read()
print(json.dumps(out))
"""


def test_runs_cannot_see_each_other(runtime):
    """Files in /tmp and /dev/shm, SysV IPC, abstract and loopback sockets, processes: all
    per run. Seccomp and Landlock are off so the namespaces alone are shown to separate."""
    m = f"sbxn{os.getpid()}"
    k = os.getpid() % 1000
    a = {}
    ready = threading.Event()

    def on_out(name, chunk):
        if b"ready" in chunk:
            ready.set()
    t = _run_bg(runtime, bare(py(NEIGHBOUR_A.format(m=m, k=k))), a, "r", on_output=on_out)
    assert ready.wait(15), a
    b = runtime.run(bare(py(NEIGHBOUR_B.format(m=m, k=k))))
    t.join(30)
    assert not isinstance(a["r"], Exception), a["r"]
    assert a["r"].status == Status.OK, (a["r"].status, a["r"].stderr)
    assert b.status == Status.OK, b.stderr
    res = json.loads(b.stdout)
    assert res["tmp"] is False and res["shm"] is False and res["unix"] is False, res
    assert res["sysv"] == -1, res
    assert res["abstract"] == 111 and res["tcp"] == 111, res   # ECONNREFUSED: nobody there
    assert len(res["procs"]) <= 2, res                         # init and itself


def test_stopping_or_killing_init_from_inside_has_no_effect(runtime):
    t0 = time.monotonic()
    r = runtime.run(sh("kill -STOP 1; kill -KILL 1; kill -SEGV 1; kill -STOP -1; sleep 0.2; echo alive",
                       wall_time_ms=5000))
    assert r.status == Status.OK and r.stdout == b"alive\n", (r.status, r.stdout, r.stderr)
    assert time.monotonic() - t0 < 4


def test_init_holds_no_capability_and_is_the_small_c_init(runtime):
    """Once a spare is staged, pid 1 is sbx-exec in init mode: contained like the workload (no
    capability in any set, no_new_privs), non-dumpable, holding none of the run's fds."""
    r = runtime.run(sh("cat /proc/1/status; ls /proc/1/fd 2>&1; echo end"))
    assert r.status == Status.OK, r
    fields = dict(ln.split(":", 1) for ln in r.stdout.decode().splitlines() if ":" in ln)
    assert fields["Name"].strip() == "sbx-init"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    assert "Permission denied" in r.stdout.decode()         # non-dumpable: /proc/1/fd is root's


def test_signals_to_init_reach_the_workload(runtime):
    """kill -USR1 1 from inside means the program, as outside a container: pid 1 forwards it.
    (Without Landlock: its signal scoping keeps the program from signalling pid 1 at all.)"""
    r = runtime.run(bare(sh('trap "echo got-usr1; exit 3" USR1; kill -USR1 1; '
                            'i=0; while [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; echo missed')))
    assert r.stdout == b"got-usr1\n", (r.stdout, r.stderr)
    assert r.status == Status.RUNTIME_ERROR and r.exit_code == 3, r


def test_the_program_leads_its_own_session_and_group(runtime):
    """Not init's: kill(0, sig) from the program reaches it and its children, never pid 1."""
    r = runtime.run(sh('echo "$(cut -d" " -f6,5 /proc/$$/stat) $$"'))
    assert r.status == Status.OK, r
    pgrp, sid, pid = r.stdout.decode().split()
    assert pgrp == sid == pid, r.stdout


TRACEME = r"""
import ctypes, os, signal, sys
l = ctypes.CDLL(None, use_errno=True)
print("traceme", l.ptrace(0, 0, 0, 0), ctypes.get_errno(), flush=True)   # PTRACE_TRACEME
if sys.argv[1] == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
os.kill(os.getpid(), signal.SIGUSR1)        # a stop reported to init if it is the tracer
sys.exit(3)
"""


def test_a_workload_that_makes_init_its_tracer_still_gets_an_honest_verdict(runtime):
    """PTRACE_TRACEME needs no permission from the parent: without seccomp the program can make
    init its tracer, and its stops are then reported to init. They are not its end: init lets it
    go on with the signal, and the verdict is what the signal or exit really was."""
    r = runtime.run(bare(plan([PY, "-c", TRACEME, "segv"])))
    assert r.stdout == b"traceme 0 0\n", (r.stdout, r.stderr)         # init is its tracer
    assert (r.status, r.signal) == (Status.SIGNALED, 11), r
    r = runtime.run(bare(plan([PY, "-c", "import signal; signal.signal(signal.SIGUSR1, lambda *a: None)\n"
                                + TRACEME, "usr1"])))
    assert r.stdout == b"traceme 0 0\n", (r.stdout, r.stderr)
    assert (r.status, r.exit_code) == (Status.RUNTIME_ERROR, 3), r
