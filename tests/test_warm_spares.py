"""Warm spares and the exec stub, on the real kernel.

A spare is built ahead for a layout (the plan without argv, env, limits, stdin): its root is
mounted and its workload staged in sbx-exec. These tests check that the fast path is taken
when it should be, that a run never lands in a spare built for another layout, that the run's
own parts (argv, env, stdin, rlimits, cgroup limits) are the run's and not the layout's first
run's, and that the stub answers a bad GO frame with an error instead of running anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sandboxd.errors import PlanError
from sandboxd.plan import Bind, Status
from sandboxd.runtime import protocol, stubgo
from tests.conftest import need_root
from tests.sandbox_helpers import plan, py, sh



@pytest.fixture(autouse=True)
def _root():
    need_root()


def _staged_run(runtime, p, **kw):
    """Run `p` once to make its layout known, give the launcher time to stage spares for it,
    then run it again."""
    runtime.run(p, **kw)
    deadline = time.monotonic() + 30
    pause = 0.3
    while True:
        # A run taking a spare still being staged waits for it (and is not "staged"): pause
        # longer each time, since the VM tier's emulated CPU stages a spare in seconds.
        time.sleep(pause)
        pause *= 2
        r = runtime.run(p, **kw)
        if r.attestation["spare"].get("staged") or time.monotonic() > deadline:
            return r


def test_a_repeated_layout_starts_in_a_staged_spare(runtime):
    r = _staged_run(runtime, plan(["/bin/true"]))
    assert r.status == Status.OK
    assert r.attestation["spare"] == {"staged": True, "layout_shared": True}
    # Everything is still attested from the kernel after the stub's last step.
    assert r.attestation["seccomp"]["mode"] == 2 and r.attestation["no_new_privs"] == 1
    assert all(v == [] for v in r.attestation["capabilities"].values())
    assert r.attestation["rlimits"]["core"] == [0, 0]


def test_argv_env_stdin_and_rlimits_are_the_runs_own(runtime):
    base = sh('echo "$1 $X"; cat; ulimit -n', open_files=64)
    _staged_run(runtime, base)
    time.sleep(1.0)            # a spare staged again for the layout
    p = dataclasses.replace(sh('echo "$0 $X"; cat; ulimit -n', open_files=99),
                            env=base.env + (("X", "mine"),))
    r = runtime.run(p, stdin=b"in\n")
    assert r.attestation["spare"]["staged"] is True          # same layout: same spare kind
    assert r.stdout == b"/bin/sh mine\nin\n99\n"
    assert r.attestation["rlimits"]["nofile"] == [99, 99]


def test_a_run_never_lands_in_a_spare_of_another_layout(runtime):
    import tempfile
    tmp_path = Path(tempfile.mkdtemp(prefix="sbx-layout-"))    # reachable by the run's uid
    tmp_path.chmod(0o755)
    (tmp_path / "secret").write_text("layout A only")
    try:
        _never_another_layout(runtime, tmp_path)
    finally:
        import shutil
        shutil.rmtree(tmp_path)


def _never_another_layout(runtime, tmp_path):
    a = dataclasses.replace(sh("cat /data/secret"))
    fs = a.filesystem
    a = dataclasses.replace(a, filesystem=dataclasses.replace(
        fs, binds=fs.binds + (Bind(source=str(tmp_path), target="/data"),)))
    r = _staged_run(runtime, a)
    assert r.stdout == b"layout A only" and r.attestation["spare"]["staged"]
    # Layout B (no /data) right after: the spares staged for A hold /data; B must not get one.
    r = runtime.run(sh("test -e /data && echo LEAK || echo clean"))
    assert r.stdout == b"clean\n", r


def test_cgroup_limits_other_than_the_layouts_are_applied(runtime):
    """Spares are tuned to their layout's first limits; a run with other limits gets its own."""
    alloc = "b = bytearray(100 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    r = _staged_run(runtime, py(alloc, memory_bytes=256 << 20))
    assert r.status == Status.OK and r.attestation["spare"]["staged"]
    r = runtime.run(py(alloc, memory_bytes=64 << 20))
    assert r.status == Status.MEMORY_LIMIT, r
    assert r.attestation["cgroup"]["memory_limit_bytes"] == 64 << 20
    r = runtime.run(py(alloc, memory_bytes=256 << 20, pids=5))
    assert r.status == Status.OK and r.attestation["cgroup"]["pids_max"] == 5


# -- the stub on its own ----------------------------------------------------------------------

def _start_stub(tmp_path):
    """sbx-exec with fd 3 a SOCK_SEQPACKET socket to us, as a staged workload would have it."""
    ours, theirs = protocol.seqpacket_pair()
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([stubgo.STUB_PATH, "-"], stdout=f, stderr=subprocess.STDOUT,
                                close_fds=False,
                                preexec_fn=lambda: os.dup2(theirs.fileno(), 3))
    theirs.close()
    assert ours.recv(16) == b"W"        # running, waiting for its GO frame
    return proc, ours, out


def test_stub_runs_a_go_frame(tmp_path):
    from sandboxd import planner
    p = planner.build_plan(["echo", "from", "stub"], env={"PATH": "/usr/bin:/bin"})
    proc, sock, out = _start_stub(tmp_path)
    fd = os.open("/dev/null", os.O_RDONLY)
    protocol.send_raw(sock, stubgo.encode(p, bpf=None, seccomp_flags=0, landlock=False, exec_rule=None),
                      fds=[fd])
    os.close(fd)
    msg = sock.recv(65536)
    assert msg[:1] == b"X"
    t_ns, status, limits = msg[1:].split(b"\0")[:3]
    assert abs(int(t_ns) - time.monotonic_ns()) < 5e9
    assert b"NoNewPrivs" in status and b"Max open files" in limits and b"256" in limits
    assert proc.wait(10) == 0
    assert out.read_bytes() == b"from stub\n"
    assert sock.recv(16) == b""        # fd 3 was close-on-exec: EOF means "exec'd"


@pytest.mark.parametrize("started_on", ["all", "last"])
def test_stub_waits_off_the_named_cpu_and_gives_the_program_the_named_set(tmp_path, started_on):
    """sbx-exec <ruleset> <CPU>:<SET>: while it waits for GO, CPU is left out of its affinity (a
    wakeup then cannot land there); the program gets SET (narrowed by any cpuset), whatever
    affinity the stub was started with: a spare is staged under an earlier run's cpuset."""
    from sandboxd import planner
    full = sorted(os.sched_getaffinity(0))
    if len(full) < 2:
        pytest.skip("needs two CPUs in this process's affinity (the stub then changes nothing)")
    start = set(full) if started_on == "all" else {full[-1]}
    p = planner.build_plan(["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
                           env={"PATH": "/usr/bin:/bin"})
    ours, theirs = protocol.seqpacket_pair()
    out = tmp_path / "out"

    def child():
        os.dup2(theirs.fileno(), 3)
        os.sched_setaffinity(0, start)
    arg = f"{full[0]}:{','.join(map(str, full))}"
    with open(out, "wb") as f:
        proc = subprocess.Popen([stubgo.STUB_PATH, "-", arg], stdout=f, stderr=subprocess.STDOUT,
                                close_fds=False, preexec_fn=child)
    theirs.close()
    assert ours.recv(16) == b"W"
    assert full[0] not in os.sched_getaffinity(proc.pid)            # waiting: off that CPU
    assert set(os.sched_getaffinity(proc.pid)) == set(full[1:]) & start
    fd = os.open("/dev/null", os.O_RDONLY)
    protocol.send_raw(ours, stubgo.encode(p, bpf=None, seccomp_flags=0, landlock=False, exec_rule=None),
                      fds=[fd])
    os.close(fd)
    assert ours.recv(65536)[:1] == b"X"
    assert proc.wait(10) == 0
    listed = out.read_bytes().decode().split(":", 1)[1].strip()
    want = os.popen("grep Cpus_allowed_list /proc/self/status").read().split(":", 1)[1].strip()
    assert listed == want                                          # the program: the full set


@pytest.mark.parametrize("arg", ["x", "0", "0:", "0:1,", "0:a", "0:99999"])
def test_stub_refuses_a_bad_cpu_argument(tmp_path, arg):
    ours, theirs = protocol.seqpacket_pair()
    proc = subprocess.Popen([stubgo.STUB_PATH, "-", arg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=False,
                            preexec_fn=lambda: os.dup2(theirs.fileno(), 3))
    theirs.close()
    msg = ours.recv(65536)
    assert msg[:1] == b"E", msg
    assert "CPU argument" in json.loads(msg[1:])["message"]
    assert proc.wait(10) == 127


def test_runs_get_the_launchers_original_cpu_set(runtime):
    """The launcher keeps to one CPU and staged stubs wait off it; neither may show in what a
    program gets: its affinity is the set the launcher was started with."""
    from sandboxd import planner
    p = planner.build_plan(["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"])
    r = _staged_run(runtime, p)
    assert r.status == Status.OK and r.attestation["spare"]["staged"], r
    want = os.popen("grep Cpus_allowed_list /proc/self/status").read().split(":", 1)[1].strip()
    assert r.stdout.decode().split(":", 1)[1].strip() == want


def test_a_staged_stub_takes_the_runs_cpuset_not_the_one_it_was_staged_under(runtime):
    """A spare is staged in the cgroup tuned for its layout's first run. A later run of the
    layout with another cpuset (or none) must get that run's CPUs: the stub puts back the
    launcher's full set, and the kernel narrows it to the run's cpuset."""
    from sandboxd import planner
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs: with one there is nothing to spread or narrow")
    want_all = os.popen("grep Cpus_allowed_list /proc/self/status").read().split(":", 1)[1].strip()
    base = planner.build_plan(["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"])

    def run(cpuset):
        r = runtime.run(dataclasses.replace(base, limits=dataclasses.replace(base.limits,
                                                                            cpuset=cpuset)))
        assert r.status == Status.OK, r
        return r.stdout.decode().split(":", 1)[1].strip(), r.attestation["spare"].get("staged")

    last = str(cpus[-1])
    _staged_run(runtime, dataclasses.replace(base, limits=dataclasses.replace(base.limits,
                                                                              cpuset=last)))
    for cpuset, want in [(None, want_all), (last, last), (str(cpus[0]), str(cpus[0])),
                         (None, want_all)]:
        time.sleep(0.5)                      # a spare staged again, under the previous run's tuning
        got, staged = run(cpuset)
        assert got == want, (cpuset, got, staged)


@pytest.mark.parametrize("frame, what", [
    (b"junk", "too short"),
    (b"\0" * 48, "bad magic"),
    (stubgo._HEADER.pack(stubgo.MAGIC, 0, 999, 0, 0, 1, 0, 0, 0), "bad sizes"),
    (stubgo._HEADER.pack(stubgo.MAGIC, 0, 0, 0, 0, 1, 0, 0, 0) + b"no-nul", "unterminated"),
    (stubgo._HEADER.pack(stubgo.MAGIC, 1 << 9, 0, 0, 0, 1, 0, 0, 0) + b"x\0", "unknown flags"),
])
def test_stub_refuses_a_malformed_go_frame(tmp_path, frame, what):
    proc, sock, out = _start_stub(tmp_path)
    fd = os.open("/dev/null", os.O_RDONLY)
    protocol.send_raw(sock, frame, fds=[fd])
    os.close(fd)
    msg = sock.recv(65536)
    assert msg[:1] == b"E"
    err = json.loads(msg[1:])
    assert err["step"] == "stub" and what in err["message"]
    assert proc.wait(10) == 127
    assert out.read_bytes() == b""


def test_stub_names_a_missing_program_and_its_errno(tmp_path):
    from sandboxd import planner
    p = planner.build_plan(["no-such-program-here"], env={"PATH": "/usr/bin:/bin"})
    proc, sock, _ = _start_stub(tmp_path)
    fd = os.open("/dev/null", os.O_RDONLY)
    protocol.send_raw(sock, stubgo.encode(p, bpf=None, seccomp_flags=0, landlock=False, exec_rule=None),
                      fds=[fd])
    os.close(fd)
    err = json.loads(sock.recv(65536)[1:])
    assert (err["step"], err["errno"], err["path"]) == ("execve", 2, "no-such-program-here")
    assert proc.wait(10) == 127


def test_go_frame_too_large_is_a_plan_error():
    from sandboxd import planner
    p = planner.build_plan(["/bin/true"], env={"BIG": "x" * (stubgo.MAX_GO + 1)})
    with pytest.raises(PlanError, match="too large"):
        stubgo.encode(p, bpf=None, seccomp_flags=0, landlock=False, exec_rule=None)


def test_go_frame_layout():
    from sandboxd import planner
    p = planner.build_plan(["/bin/echo", "a"], env={"PATH": "/p"})
    f = stubgo.encode(p, bpf=b"\0" * 16, seccomp_flags=8, landlock=True,
                      exec_rule=("/box/prog", 5))
    h = stubgo._HEADER.unpack_from(f)
    magic, flags, nrl, sflags, blen, argc, envc, _, access = h
    assert magic == stubgo.MAGIC and flags == stubgo.F_SECCOMP | stubgo.F_LANDLOCK | stubgo.F_LANDLOCK_EXEC_RULE
    assert (sflags, blen, argc, envc, access) == (8, 16, 2, len(p.env), 5)
    strings = f[stubgo._HEADER.size + nrl * stubgo._RLIMIT.size + 16:].split(b"\0")
    assert strings[:6] == [b"/p", b"/box/prog", b"", b"", b"/bin/echo", b"a"]


def test_a_staged_spare_that_dies_idle_is_retired_not_given_a_run(runtime):
    """Kill every staged stub of this launcher while it waits: the launcher hears of it and the
    next runs get working spares, not a dead one."""
    p = plan(["/bin/echo", "alive"])
    _staged_run(runtime, p)
    time.sleep(1.0)
    start, count = runtime.host_info()["userns"]["range"]
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            uid = int(open(f"/proc/{pid}/status").read().split("\nUid:")[1].split()[1])
        except (OSError, IndexError):
            continue
        if cmd.startswith(b"sbx-exec\0") and start <= uid < start + count:
            os.kill(int(pid), 9)
            killed += 1
    assert killed >= 1
    time.sleep(0.5)
    for _ in range(4):
        r = runtime.run(p)
        assert r.status == Status.OK and r.stdout == b"alive\n", r


def test_runs_of_one_layout_get_their_own_argv_env_and_limits(runtime):
    """GO frames are remembered per layout by (argv, env, limits): each run still gets its own."""
    from sandboxd import planner
    import dataclasses as dc

    def p(word, var, fsize):
        base = planner.build_plan(["/bin/sh", "-c", f'echo {word} $V; ulimit -f'],
                                  env={"PATH": "/usr/bin:/bin", "V": var})
        return dc.replace(base, limits=dc.replace(base.limits, file_size_bytes=fsize))
    first = _staged_run(runtime, p("one", "x", 1 << 20))
    assert first.stdout == b"one x\n2048\n", first.stdout
    for word, var, fsize, blocks in [("one", "x", 1 << 20, 2048), ("two", "x", 1 << 20, 2048),
                                     ("one", "y", 1 << 20, 2048), ("one", "x", 2 << 20, 4096),
                                     ("one", "x", 1 << 20, 2048)]:
        r = runtime.run(p(word, var, fsize))
        assert r.stdout == f"{word} {var}\n{blocks}\n".encode(), (word, var, fsize, r.stdout)


def test_spares_that_keep_failing_are_retried_with_backoff():
    """A spare that dies before its namespaces exist (here: starting init fails in every
    supervisor) must not be remade at once, again and again: the launcher waits longer after each
    failure in a row. Without that it made ~300 failing spares in 3 s here (measured)."""
    import select
    from sandboxd.runtime import launcher, sandbox
    from sandboxd.runtime.config import RuntimeConfig
    ours, theirs = protocol.seqpacket_pair()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                              # the launcher, with a broken spawn_init
        try:
            ours.close()
            os.close(r)
            os.dup2(w, 2)
            import sys
            sys.stderr = open(2, "w", buffering=1, closefd=False)   # not pytest's capture

            def broken(*_, **__):
                raise OSError(12, "injected phase-A failure")
            sandbox.spawn_init = broken
            launcher.run_launcher(theirs, RuntimeConfig(instance=f"backoff{os.getpid()}"))
        finally:
            os._exit(0)
    theirs.close()
    os.close(w)
    try:
        assert protocol.recv(ours)[0] == protocol.GO        # up and serving
        time.sleep(3.0)
    finally:
        ours.close()                                        # the launcher cleans up and exits
    err = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([r], [], [], deadline - time.monotonic())[0]:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            err += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    failures = err.decode(errors="replace").count("injected phase-A failure")
    # 20, 40, 80, ... ms apart: 8 or 9 in 3 s (plus the first spares made at once).
    assert 3 <= failures <= 14, (failures, err[-2000:])


def test_a_remembered_plan_is_still_checked_and_each_run_keeps_its_stdin(runtime):
    """The launcher remembers decoded plans by their frame: a refused plan is refused every time
    (only accepted ones are remembered), and runs of one remembered plan still get their own
    stdin and output."""
    bad = dataclasses.replace(plan(["/bin/true"]), env=(("A=B", "x"),))
    for _ in range(3):
        with pytest.raises(PlanError, match="invalid plan values: env"):
            runtime.run(bad)
    p = plan(["/bin/cat"])
    for word in (b"one", b"two", b"three"):
        r = runtime.run(p, stdin=word)
        assert r.status == Status.OK and r.stdout == word, r


def test_stub_in_init_mode_forks_the_workload_reaps_and_reports(tmp_path):
    """sbx-exec <ruleset> <cpu> <status-fd>: the process stays as init (reaps, forwards signals,
    writes the workload's wait status and rusage as JSON to the status fd, then waits to be
    killed), its fork takes the GO frame. Init keeps none of the run's fds: EOF on the sync
    socket still means "the program exec'd"."""
    import signal
    from sandboxd import planner
    p = planner.build_plan(["/bin/sh", "-c", 'trap "exit 7" USR1; echo up; '
                            'while :; do sleep 0.05; done'], env={"PATH": "/usr/bin:/bin"})
    ours, theirs = protocol.seqpacket_pair()
    r, w = os.pipe()
    out = tmp_path / "out"

    def child():
        os.dup2(theirs.fileno(), 3)
        os.dup2(w, stubgo.STATUS_FD)
    with open(out, "wb") as f:
        proc = subprocess.Popen([stubgo.STUB_PATH, "-", "-", str(stubgo.STATUS_FD)], stdout=f,
                                stderr=subprocess.STDOUT, close_fds=False, preexec_fn=child)
    theirs.close()
    os.close(w)
    try:
        assert ours.recv(16) == b"W"
        with open(f"/proc/{proc.pid}/status") as st:
            fields = dict(ln.split(":", 1) for ln in st.read().splitlines())
        assert fields["Name"].strip() == "sbx-init"
        # stdio and the sync socket are the workload's only (the test's own fds stay open
        # here: in a run, init's Python side closed everything but these before the exec).
        # The workload's "W" may come before init closed them: wait for that.
        deadline = time.monotonic() + 5
        while True:
            fds = {int(x) for x in os.listdir(f"/proc/{proc.pid}/fd")}
            if not fds & {0, 1, 2, 3} or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert stubgo.STATUS_FD in fds and not fds & {0, 1, 2, 3}, fds
        fd = os.open("/dev/null", os.O_RDONLY)
        protocol.send_raw(ours, stubgo.encode(p, bpf=None, seccomp_flags=0, landlock=False,
                                              exec_rule=None), fds=[fd])
        os.close(fd)
        assert ours.recv(65536)[:1] == b"X"
        assert ours.recv(16) == b""                       # the program exec'd: EOF, init or not
        deadline = time.monotonic() + 10
        while b"up" not in out.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)                # to init: forwarded to the program
        rep = json.loads(os.read(r, 4096))
        assert os.waitstatus_to_exitcode(rep["wait_status"]) == 7, rep
        assert set(rep) == {"wait_status", "utime", "stime", "maxrss_kb", "t_exit_ns"}
        assert abs(rep["t_exit_ns"] - time.monotonic_ns()) < 5e9 and rep["maxrss_kb"] > 0
        time.sleep(0.1)
        assert proc.poll() is None                        # init waits to be killed
    finally:
        proc.kill()
        proc.wait()
        os.close(r)


def test_the_program_starts_with_every_signal_default_and_none_blocked(runtime):
    """init is posix_spawned: glibc leaves its own signals (32, 33) ignored in the child, and an
    ignored signal survives execve. init resets all 64 with the raw syscalls."""
    p = plan(["/bin/sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"])
    for r in (runtime.run(p), _staged_run(runtime, p)):
        assert r.status == Status.OK, r
        assert r.stdout.decode().split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000"]


def test_a_spare_init_of_a_root_launcher_is_not_dumpable(runtime):
    """The supervisor of a root launcher changes its uid to the run's: init (exec'd, so dumpable
    again) makes itself non-dumpable before it clones, so nothing running as the run's host uid
    can ptrace it or open its /proc files while it holds every capability of its namespaces."""
    p = plan(["/bin/true"])
    _staged_run(runtime, p)
    time.sleep(0.5)
    start, count = runtime.host_info()["userns"]["range"]
    seen = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                st = dict(ln.split(":", 1) for ln in f.read().splitlines())
            uid = int(st["Uid"].split()[1])
        except (OSError, KeyError, ValueError):
            continue
        if st["Name"].strip() in ("sbx-init", "sbx-exec") and start <= uid < start + count:
            assert os.stat(f"/proc/{pid}/mem").st_uid == 0, (pid, st["Name"])   # root-owned: not dumpable
            seen += 1
    assert seen >= 2                      # the staged spares' inits and their waiting workloads


def test_a_layout_with_a_large_generated_file_runs(runtime):
    """The pickled layout and init's blob travel in frames of their own: each holds the plan's
    generated files once, so a 70 kB file fits as it did when init was Python."""
    base = plan(["/bin/sh", "-c", "wc -c < /etc/big"])
    fs = base.filesystem
    p = dataclasses.replace(base, filesystem=dataclasses.replace(
        fs, files=fs.files + (("/etc/big", "x" * 70000),)))
    r = runtime.run(p)
    assert r.status == Status.OK and r.stdout == b"70000\n", r


def test_back_to_back_runs_of_one_layout_all_get_their_own_result(runtime):
    """Back to back, a run mostly takes a spare still being staged: the launcher tells it a run
    waits (HURRY), before, during or after its warm-up, and START must still find it. Every
    run's own argv and output, whichever spare it got."""
    for i in range(40):
        r = runtime.run(plan(["/bin/echo", f"run{i}"]))
        assert r.status == Status.OK and r.stdout == f"run{i}\n".encode(), (i, r)
