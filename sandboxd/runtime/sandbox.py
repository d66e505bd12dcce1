"""The processes of one run: a supervisor forked from the launcher, an init in C.

Theory of operation. The launcher is a single-threaded Python process, so fork() is safe and
the child may run Python. Per run:

  launcher ─fork─> supervisor ─posix_spawn─> sbx-exec init ─clone(NEWUSER|NEWPID|PARENT)─> init (pid 1)
                                             init ─fork─> workload (waits for GO) ─exec─> program

* supervisor (host side, Python): takes the run's host uid/gid (no supplementary groups) and
  spawns init (spawn_init), ahead of time as a spare. The launcher's host worker writes init's
  uid/gid map and puts init into its cgroup; PLACED lets init make its namespaces; LAYOUT (the
  LayoutContext's blob: everything of the plan but argv, env, limits, stdin) has init build
  the root, contain itself and fork the workload, which waits for the run; READY hands the
  launcher the workload's socket. At the run the launcher sends the workload its GO frame and
  this process START. The supervisor stays outside the cgroup (its work is not charged to the
  workload) and runs the run's event loop: output pipes -> client with caps, seccomp user
  notifications (denials reported by name), wall/CPU deadlines, cancellation; then the result
  to the client and the report to the launcher. Killing init kills the whole pid namespace:
  "kill the run" is one signal.
* init: pid 1 of the run, C from its first instruction (stub/sbx-exec.c, build_main): no copy
  of the interpreter is made, written to or torn down for it. Phase A unshares mount, net, ipc,
  uts and cgroup namespaces (cgroup after the placement, so the run sees its own cgroup as /).
  Phase B (the layout) builds the root filesystem (mounts.compile_root's ops) and pivots into
  it, then the containment order below; then it stays pid 1: forwards signals, reaps orphans,
  reports the workload's wait status. When it is killed the kernel kills everything left in
  the namespace, so no background child outlives the run.
* workload: init's fork; it waits for GO and does the run's own steps (sbx-exec.c, workload()).

Every channel is a CLOEXEC pipe or socket; each process closes what it does not need at once.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from sandboxd.errors import LaunchError, SandboxError
from sandboxd.plan import Limits, Plan
from sandboxd.runtime import apparmor, linux, protocol, result, seccomp, stubgo

# Everything the supervisor uses is imported here, in the launcher: it is forked, and an import
# there would cost every run (landlock: unpickling a LayoutContext needs LandlockRules).
import fcntl  # noqa: E402  (spawn_init)
from sandboxd.runtime import landlock  # noqa: E402,F401

SYNC_FD = 3            # the workload's sync socket sits here; seccomp's sendmsg exception names it
OUTPUT_CHUNK = 65536


@dataclass
class LayoutContext:
    """What a spare is built for: everything of a plan but the run itself (argv, env, limits,
    stdin). Made by the launcher once per layout and sent, pickled, to each spare of that
    layout; the spare builds the root and stages the workload with it before any run exists.

    It travels over the launcher's own sockets to its own forked children (same code, same
    trust). Only plain values cross."""

    def __getstate__(self) -> dict:
        # The blob repeats the plan's generated files: pickled too, a layout near the frame
        # limit would not fit. The launcher sends it after the pickle (LAYOUT_BLOB).
        return dict(self.__dict__, layout_blob=b"")

    plan: Plan                          # the plan that defined the layout; only layout fields are used
    keep_caps: int
    seccomp_compiled: Any = None        # seccomp.CompiledFilter; None: no filter
    landlock_rules: Any = None          # landlock.LandlockRules (without argv[0]); None: no Landlock
    apparmor_transition: Any = None     # apparmor.ExecTransition; None: no profile to apply
    root_mountpoint: str = "/run/sandboxd/root"   # from RuntimeConfig: a host detail, not the plan's
    avoid_cpu: str = ""                 # "CPU:SET": the staged stub waits off the launcher's CPU and
                                        # takes SET back before the run ("": stays as it is)
    layout_blob: bytes = b""            # what init builds the sandbox from (stubgo.encode_layout);
                                        # sent in a frame of its own, never pickled
    landlock_attestation: Any = None    # the ruleset's attestation but for init's counts; None: no rules


@dataclass
class RunStart:
    """The run itself, sent to a staged spare's supervisor with the run's socket, right after
    the launcher sent the stub its GO frame. Only what the supervisor needs beyond its layout:
    of the plan, the parts a run may change without changing the layout and that the
    supervisor uses (argv and env are the stub's alone)."""

    limits: Limits                      # the run's limits (deadlines, output caps, verdict)
    output_limit_action: str            # Plan.output_limit_action
    cpu_base_ns: int                    # the cgroup's CPU time just before GO
    t_go_ns: int                        # CLOCK_MONOTONIC just before GO: deadlines run from it
    base: dict                          # the launcher's part of the attestation (result.build)

    def plan_of(self, layout_plan: Plan) -> Plan:
        """The run's plan as far as the supervisor and result.build read it."""
        if layout_plan.limits == self.limits and layout_plan.output_limit_action == self.output_limit_action:
            return layout_plan
        return dataclasses.replace(layout_plan, limits=self.limits,
                                   output_limit_action=self.output_limit_action)


# ---------------------------------------------------------------------------------------------
# the containment order: init's steps ahead of the run, then the workload's at the run. Each
# step's position matters. Both are C (stub/sbx-exec.c): init is the stub's build mode
# (build_main), the workload its fork (workload()).
#
#   init (pid 1), ahead of the run        the workload, at the run
#   0 signals default, mask empty         7  stdin to fd 0
#     (all 64), non-dumpable (root)       8  rlimits
#   1 root built, pivoted; non-dumpable   9  resolve argv[0] in PATH
#   2 setsid                              10 AppArmor: profile at the next execve
#   3 chdir to the plan's cwd             11 Landlock: argv[0]'s file rule, restrict_self
#   4 drop capabilities                   12 seccomp filter (last)
#   5 no_new_privs                        13 read back status/limits; EXEC + listener; execve
#   6 Landlock ruleset built (not yet enforced), STAGED; fork the workload
# The split is for speed: everything left of it is done while the spare waits.
# ---------------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


INIT_SOCK_FD = 6       # init's end of the init socket while it is set up (sbx-exec.c: ISOCK_FD)


def spawn_init(stub_fd: int, out_w: int, err_w: int, sync_c: int, status_w: int,
               isock_c: int, *, nodump: bool = False) -> int:
    """Start the run's init: posix_spawn (vfork + exec: nothing of this interpreter is copied
    or torn down) of `sbx-exec init`, which clones pid 1 of new user and pid namespaces as our
    child, says its pid on the init socket ("F<pid>") and exits; returns the spawner's pid.
    nodump: init is non-dumpable from the start (the caller changed its uid: a root launcher)."""
    # Sources out of the way of the numbers they go to, so no dup2 clobbers another's source
    # (the stub's fd included: it is exec'd after the dup2s).
    hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)
          for fd in (out_w, err_w, sync_c, status_w, isock_c, stub_fd)]
    devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        targets = (1, 2, SYNC_FD, stubgo.STATUS_FD, INIT_SOCK_FD)
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in zip(hi, targets)]
        try:
            pid = os.posix_spawn(f"/proc/self/fd/{hi[5]}", ["sbx-exec", "init", "nodump" if nodump else "dump"], {},
                                 file_actions=actions, setsigmask=(),
                                 setsigdef=_ALL_SIGNALS)
        except OSError as e:
            raise LaunchError("spawn the run's init (sbx-exec init)", step="init", errno=e.errno) from None
    finally:
        for fd in hi + [devnull]:
            os.close(fd)
    return pid


# Every catchable signal back to its default in init: Python ignores SIGPIPE and SIGXFSZ, and an
# ignored signal survives execve (writers to a closed pipe would spin on EPIPE; the file size
# limit would become EFBIG instead of the signal the verdict relies on).
_ALL_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


# ---------------------------------------------------------------------------------------------
# supervisor
# ---------------------------------------------------------------------------------------------
def supervisor_main(lsock: socket.socket, host_uid: int, host_gid: int, stub_fd: int) -> None:
    """Runs in the fork of the launcher; never returns."""
    linux.set_name(b"sbx-supervisor")
    code = 0
    try:
        code = _supervise(lsock, host_uid, host_gid, stub_fd)
    except BaseException as e:  # noqa: BLE001
        try:
            err = e if isinstance(e, SandboxError) else LaunchError(repr(e), step="supervisor")
            protocol.send(lsock, protocol.REPORT, {"launch_error": err.to_dict()})
        except OSError:
            pass
        code = 1
    os._exit(code)


class _Run:
    def __init__(self) -> None:
        self.kill_reason: str | None = None
        self.denials: dict[str, list] = {}
        self.truncated = {"stdout": False, "stderr": False}
        self.counts = {"stdout": 0, "stderr": 0}
        self.launch_error: dict | None = None
        self.attestation: dict = {}
        self.t_exec_ns: int | None = None
        self.cpu_base_ns: int | None = None
        self.workload: dict | None = None
        self.cancelled = False
        self.denial_count = 0
        self.t_end_ns: int | None = None
        self.staged = False                # init built the root, contained itself (STAGED)
        self.stub_waiting = False          # the stub runs and waits for GO
        self.cgroup: Any = None            # the run's RunCgroup, from PLACED


def _supervise(lsock: socket.socket, host_uid: int, host_gid: int, stub_fd: int) -> int:
    switched = os.geteuid() == 0
    if switched:
        # Become the run's host identity before init makes its user namespace: the namespace's
        # owner is then the run's uid, so per-user kernel counts of everything inside (inotify
        # instances and watches, message queues, pending signals) are the run's, not host root's.
        os.setgroups([])                           # host root's groups must not follow into the sandbox
        os.setresgid(host_gid, host_gid, host_gid)
        os.setresuid(host_uid, host_uid, host_uid)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, step="supervisor")   # after: a uid change clears it
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    sync_p, sync_c = protocol.seqpacket_pair()
    sync_p.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # learn the workload's host pid
    isock_p, isock_c = protocol.seqpacket_pair()

    spid = spawn_init(stub_fd, out_w, err_w, sync_c.fileno(), status_w, isock_c.fileno(),
                      nodump=switched)
    for fd in (out_w, err_w, status_w):
        os.close(fd)
    sync_c.close()
    isock_c.close()
    # The spawner says "F<pid>" (init, our child: CLONE_PARENT) and exits: once it is reaped,
    # the frame is there or never comes (init, if cloned, holds the socket's other end open).
    os.waitpid(spid, 0)
    try:
        kind, payload, _ = protocol.recv(isock_p, nonblocking=True)
    except BlockingIOError:
        kind, payload = b"", b""
    if kind != b"F":
        st = _Run()                                # its error, if it said one, is on the sync socket
        while st.launch_error is None and _on_sync(None, sync_p, st, lsock, drain=True):
            pass
        protocol.send(lsock, protocol.REPORT, {"launch_error": st.launch_error or LaunchError(
            "sbx-exec init ended before starting init", step="init").to_dict()})
        return 0
    ipid = int(payload)
    pidfd = linux.pidfd_open(ipid)
    protocol.send(lsock, protocol.FORKED, {"init_pid": ipid})
    # The launcher maps init's ids and places it in its cgroup, then says PLACED: init may go
    # on with what does not depend on the run (its namespaces).
    kind, payload, _ = protocol.recv(lsock)
    if kind != protocol.PLACED:
        return 0
    placed = pickle.loads(payload)
    cgroup = placed.pop("cgroup")                  # the run's cgroup: CPU polled, numbers read
    try:
        protocol.send(isock_p, protocol.PLACED,
                      f"{placed['uid']} {placed['gid']} {1 if placed['net'] else 0}".encode())
        kind, _, _ = protocol.recv(isock_p)
    except OSError:
        kind = b""
    if kind != protocol.NAMESPACED:
        # init failed in phase A (its report is on the sync socket) or was killed.
        st = _Run()
        while st.launch_error is None and _on_sync(None, sync_p, st, lsock):
            pass
        protocol.send(lsock, protocol.REPORT, {"launch_error": st.launch_error or LaunchError(
            "init ended before making its namespaces", step="init").to_dict()})
        return 0
    protocol.send(lsock, protocol.NAMESPACED)

    # The layout: init builds the root, contains itself and forks the workload, which waits for
    # GO. Then this spare is ready; wait for a run (a spare may wait long). EOF: retired, and
    # init dies with us. Init dying first (killed from outside) is said at once, so the
    # launcher retires this spare instead of giving it a layout and a run.
    with selectors.DefaultSelector() as waiting:
        waiting.register(lsock, selectors.EVENT_READ, "launcher")
        waiting.register(pidfd, selectors.EVENT_READ, "init")
        if "launcher" not in {key.data for key, _ in waiting.select()}:
            protocol.send(lsock, protocol.REPORT, {"launch_error": LaunchError(
                "the spare's init ended before its layout came", step="spare").to_dict()})
            return 0
    kind, payload, _ = protocol.recv(lsock)
    if kind != protocol.LAYOUT:
        return 0
    ctx: LayoutContext = pickle.loads(payload)
    kind, blob, _ = protocol.recv(lsock)           # init's blob follows in its own frame
    if kind != protocol.LAYOUT_BLOB:
        return 0
    try:
        protocol.send(isock_p, protocol.LAYOUT, blob)
    except OSError:
        pass                                       # init is gone: the sync socket's EOF says so below
    isock_p.close()
    st = _Run()
    # Blocking is fine: init and the workload either stage or report an error, and a failed
    # init takes its pid namespace (and this socket's other ends) with it.
    while not (st.staged and st.stub_waiting) and st.launch_error is None:
        if not _on_sync(ctx, sync_p, st, lsock):
            break
    if not (st.staged and st.stub_waiting):
        protocol.send(lsock, protocol.REPORT, {"launch_error": st.launch_error or LaunchError(
            "the spare ended while being staged", step="init").to_dict()})
        return 0
    # A run already waits for this spare (HURRY): going through a made-up run's end first would
    # only delay its READY by the warm-up (~2-4 ms here); the run's end pays the page copies.
    try:
        kind, _, _ = protocol.recv(lsock, nonblocking=True)
    except BlockingIOError:
        kind = None
    if kind == b"":
        return 0                                   # retired
    if kind != protocol.HURRY:
        _warm_up(ctx, cgroup)
    # The run's event loop, made now (a staged spare may wait long; a run should not wait for
    # this): everything but the client's socket, which comes with START.
    sel = selectors.DefaultSelector()
    streams = {out_r: ("stdout", protocol.OUT1), err_r: ("stderr", protocol.OUT2)}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, "pipe")
    sel.register(status_r, selectors.EVENT_READ, "status")
    sel.register(sync_p, selectors.EVENT_READ, "sync")
    sel.register(pidfd, selectors.EVENT_READ, "init")
    # READY carries our end of the sync socket: the launcher sends the stub its GO frame
    # itself, so a run's start does not wait for this process to be scheduled.
    protocol.send(lsock, protocol.READY, fds=[sync_p.fileno()])
    # Idle until the run. A staged spare can die meanwhile (the stub or init killed, say by
    # its cgroup's limits): say so, so the launcher retires it instead of sending it a run.
    idle = selectors.DefaultSelector()
    idle.register(lsock, selectors.EVENT_READ, "launcher")
    idle.register(pidfd, selectors.EVENT_READ, "init")
    idle.register(sync_p, selectors.EVENT_READ, "sync")
    while True:
        tags = {key.data for key, _ in idle.select()}
        if "launcher" in tags:
            break
        # The launcher sends GO to the stub before START to us, so the stub may speak first:
        # a message means the run has begun (START is on its way); EOF with nothing before it,
        # or init gone with nothing said, means the spare died idle.
        try:
            peek = sync_p.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            peek = None
        except OSError:
            peek = b""
        if peek:
            break
        if peek is None and "init" not in tags:
            continue
        protocol.send(lsock, protocol.REPORT, {"launch_error": LaunchError(
            "the staged spare ended while waiting for a run", step="spare").to_dict()})
        return 0
    idle.close()
    kind, payload, fds = protocol.recv(lsock)
    while kind == protocol.HURRY:                  # sent while this spare warmed up: START follows
        kind, payload, fds = protocol.recv(lsock)
    if kind != protocol.START or len(fds) != 1:
        return 0
    run_sock = socket.socket(fileno=fds[0])
    start: RunStart = pickle.loads(payload)
    plan = start.plan_of(ctx.plan)
    st.cgroup = cgroup
    st.cpu_base_ns = start.cpu_base_ns
    lim = plan.limits
    out_caps = {"stdout": lim.stdout_bytes, "stderr": lim.stderr_bytes}
    sel.register(run_sock, selectors.EVENT_READ, "client")
    listener = -1
    open_pipes = set(streams)
    cpu_limit_ns = None if lim.cpu_time_ms is None else (lim.cpu_time_ms + lim.cpu_extra_ms) * 1_000_000
    init_done = False
    pre_att: dict | None = None    # the attestation, parsed once the stub's read-back is in
    finished = False           # the workload ended and nothing else of the run is left
    # Deadlines run from GO (the stub's last steps are microseconds of the run's time).
    go_s = start.t_go_ns / 1e9
    wall_deadline: float | None = go_s + lim.wall_time_ms / 1000.0
    cpu_next: float | None = time.monotonic() if cpu_limit_ns is not None else None
    ncpu = max(1, len(os.sched_getaffinity(0)))
    status_buf = b""

    def kill(reason: str) -> None:
        if st.kill_reason is None:
            st.kill_reason = reason
        linux.pidfd_send_signal(pidfd, signal.SIGKILL)

    def cpu_used() -> int:
        if st.cgroup is None or st.cpu_base_ns is None:
            return 0
        return st.cgroup.cpu_usage_ns() - st.cpu_base_ns

    # Output to the client never blocks this loop (its deadlines must keep running while a
    # client is slow): frames the socket cannot take wait in a bounded outbox, and the output
    # pipes are not read meanwhile, so the workload blocks on a full pipe instead.
    run_sock.setblocking(False)
    outbox: collections.deque[bytes] = collections.deque()
    client_open = True
    flush_deadline: float | None = None

    def emit(frame: bytes) -> None:
        nonlocal client_open
        if not client_open:
            return
        if not outbox:
            try:
                run_sock.sendmsg([frame])
                return
            except BlockingIOError:
                pass
            except OSError:
                client_open = False
                st.cancelled = True
                kill("CANCELLED")
                return
            for fd in open_pipes:                    # pause output until the client catches up
                sel.unregister(fd)
            sel.modify(run_sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "client")
        outbox.append(frame)

    def flush() -> None:
        nonlocal client_open
        while outbox:
            try:
                run_sock.sendmsg([outbox[0]])
            except BlockingIOError:
                return
            except OSError:
                client_open = False
                outbox.clear()
                break
            outbox.popleft()
        for fd in open_pipes:
            sel.register(fd, selectors.EVENT_READ, "pipe")
        if client_open:
            sel.modify(run_sock, selectors.EVENT_READ, "client")

    def read_pipe(fd: int) -> bool:
        """One chunk of a stream to the client; False when nothing more is there now."""
        name, kind = streams[fd]
        cap = out_caps[name]
        try:
            chunk = os.read(fd, OUTPUT_CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            if fd in sel.get_map():
                sel.unregister(fd)
            open_pipes.discard(fd)
            return False
        room = cap - st.counts[name]
        if len(chunk) > room:
            chunk = chunk[:max(0, room)]
            st.truncated[name] = True
            if plan.output_limit_action == "kill":
                kill("OUTPUT_LIMIT")
        st.counts[name] += len(chunk)
        if chunk:
            emit(kind + chunk)
        return True

    init_killed = False        # init told to go (it waits for that after its report)
    while not (finished and not open_pipes and not outbox):
        now = time.monotonic()
        if finished and outbox:
            # Everything ran; only the client is late. Wait for it a while, not forever.
            flush_deadline = flush_deadline or now + 30.0
            if now > flush_deadline:
                outbox.clear()
                st.attestation["output_undelivered"] = True
                break
        timeout = None
        for d in (wall_deadline, cpu_next, flush_deadline):
            if d is not None:
                timeout = max(0.0, d - now) if timeout is None else min(timeout, max(0.0, d - now))
        for key, _ev in sel.select(timeout):
            tag = key.data
            if tag == "pipe":
                read_pipe(key.fd)
            elif tag == "status":
                data = os.read(status_r, 4096)
                if data:
                    status_buf += data
                    try:                            # one write() of a few bytes: complete at once
                        st.workload = json.loads(status_buf)
                    except ValueError:
                        pass
                else:
                    sel.unregister(status_r)
                    if status_buf and st.workload is None:
                        st.workload = json.loads(status_buf)
            elif tag == "sync":
                more = _on_sync(ctx, sync_p, st, lsock)
                if st.attestation.get("_listener", -1) >= 0:
                    listener = st.attestation.pop("_listener")
                    sel.register(listener, selectors.EVENT_READ, "notify")
                if st.t_exec_ns is not None and pre_att is None:
                    # The read-back is complete now: parse it while the program runs, not
                    # after it ended (what changes later is patched in by result.build).
                    pre_att = result.attest(plan, {"attestation": st.attestation}, start.base)
                if not more:
                    # EOF: the workload exec'd (the socket is CLOEXEC) or died. An execve that
                    # fails after EXEC still reports on this socket first.
                    sel.unregister(sync_p)
                    if ctx.apparmor_transition is not None and st.launch_error is None:
                        _verify_apparmor(ctx, st, kill)
            elif tag == "notify":
                if not _on_notify(ctx, listener, st, kill):
                    sel.unregister(listener)
                    os.close(listener)
                    listener = -1
            elif tag == "client":
                if _ev & selectors.EVENT_WRITE:
                    flush()
                if _ev & selectors.EVENT_READ and client_open:
                    try:
                        kind, _, fds = protocol.recv(run_sock)
                    except BlockingIOError:
                        continue
                    except OSError:
                        kind = b""
                    if kind == protocol.CANCEL or kind == b"":
                        st.cancelled = True
                        kill("CANCELLED")
                        if kind == b"":             # the client is gone: nothing to deliver to
                            client_open = False
                            outbox.clear()
                            sel.unregister(run_sock)
                            for fd in open_pipes:   # keep draining so the workload is not stuck
                                if fd not in sel.get_map():
                                    sel.register(fd, selectors.EVENT_READ, "pipe")
            elif tag == "init":
                _, status = os.waitpid(ipid, 0)
                st.t_end_ns = time.monotonic_ns()   # the run's end, whatever the client's pace
                # Init's raw wait status: SIGKILL (9) when it was ended here after the result
                # (it waits for that once it reported), else its own exit.
                st.attestation["init_wait_status"] = status
                sel.unregister(pidfd)
                init_done = finished = True
        if not finished and st.workload is not None and not init_killed:
            # The workload ended (init reported it and waits). Its output's end may be queued
            # behind the report: take it now (a few reads at most, while the client keeps up).
            for fd in list(open_pipes):
                for _ in range(4):
                    if outbox or not read_pipe(fd):
                        break
            # Nothing but init left in the cgroup and the output closed: the numbers are final,
            # and the result need not wait for init's exit and the namespaces' teardown (init
            # is killed after the result). Otherwise (background processes, or output still
            # held open) init's exit is what ends the rest of the run: kill it now, wait for it.
            left = [ipid]
            if not open_pipes:
                try:
                    left = st.cgroup.pids(first_only=True) if st.cgroup is not None else [ipid]
                except SandboxError:
                    left = [ipid, -1]
            if not open_pipes and set(left) <= {ipid}:
                finished = True
                st.t_end_ns = time.monotonic_ns()
            else:
                linux.pidfd_send_signal(pidfd, signal.SIGKILL)
                init_killed = True
        now = time.monotonic()
        if wall_deadline is not None and now >= wall_deadline and not finished:
            kill("WALL_TIME_LIMIT")
            wall_deadline = None
        if cpu_next is not None and now >= cpu_next and not finished:
            used = cpu_used()
            if used >= cpu_limit_ns:
                kill("TIME_LIMIT")
                cpu_next = None
            else:
                # Next look when the remaining budget could be gone if every CPU were spinning.
                cpu_next = now + min(0.1, max(0.002, (cpu_limit_ns - used) / 1e9 / ncpu))
    # The stub's last word (an execve that failed after EXEC) may still be queued when the
    # run ended early: read it before deciding what the run was.
    if sync_p.fileno() in {k.fd for k in sel.get_map().values()}:
        while _on_sync(ctx, sync_p, st, lsock, drain=True):
            pass
        fd = st.attestation.pop("_listener", -1)
        if fd >= 0:
            os.close(fd)               # the run is over: nothing more to answer
    # status pipe may still hold the report if init exited right after writing it
    if st.workload is None:
        try:
            data = status_buf + os.read(status_r, 4096)
            if data:
                st.workload = json.loads(data)
        except (OSError, ValueError):
            pass
    report = {
        "launch_error": st.launch_error,
        "kill_reason": st.kill_reason,
        "cancelled": st.cancelled,
        "workload": st.workload,
        "t_exec_ns": st.t_exec_ns,
        "t_end_ns": st.t_end_ns,
        "cpu_base_ns": st.cpu_base_ns,
        "denials": st.denials,
        "truncated": st.truncated,
        "attestation": st.attestation,
    }
    # A run that reached its program: the result goes from here straight to the client (one
    # process hop less than through the launcher), then the report to the launcher, which
    # releases the run's resources. Anything else is the launcher's to answer.
    report["delivered"] = False
    if st.launch_error is None and st.t_exec_ns is not None and st.cgroup is not None and client_open:
        try:
            numbers = {"cpu_ns": st.cgroup.cpu_usage_ns(), "peak": st.cgroup.memory_peak(),
                       "ooms": st.cgroup.oom_kills()}
            res = result.build(plan, report, numbers, start.base, attestation=pre_att)
            frame = protocol.RESULT + json.dumps(res.to_dict(include_output=False), separators=(",", ":")).encode()
            run_sock.settimeout(30.0)
            run_sock.sendmsg([frame])
            report["delivered"] = True
        except (SandboxError, OSError, ValueError, KeyError) as e:
            report["deliver_error"] = repr(e)
    protocol.send(lsock, protocol.REPORT, report)
    if not init_done:
        linux.pidfd_send_signal(pidfd, signal.SIGKILL)   # it waits for this after its report
        os.waitpid(ipid, 0)
    return 0


def _warm_up(ctx: LayoutContext, cgroup: Any) -> None:
    """Go once through a run's end on made-up values, while the spare waits.

    This process is a fork of the zygote: the first touch of each page of the interpreter's
    objects (a reference count is a write) copies it, several microseconds per page on a VM.
    The first START, attestation and Result cost ~2 ms that way, the same again ~0.5 ms
    (measured); this moves the copying ahead of the run."""
    try:
        base = {"host_ns": {}, "seccomp": {}, "landlock": {}, "apparmor": {}, "cgroup": {}, "spare": {}}
        start = pickle.loads(pickle.dumps(RunStart(limits=ctx.plan.limits,
                                                   output_limit_action=ctx.plan.output_limit_action,
                                                   cpu_base_ns=0, t_go_ns=0, base=base),
                                          protocol=pickle.HIGHEST_PROTOCOL))
        plan = start.plan_of(ctx.plan)
        with open("/proc/self/status") as f:
            status = f.read()
        with open("/proc/self/limits") as f:
            limits = f.read()
        rep = {"attestation": {"status": status, "limits": limits, "ns": {"pid": 0}},
               "workload": json.loads(json.dumps({"wait_status": 0, "t_exit_ns": 1})),
               "t_exec_ns": 0, "cpu_base_ns": 0, "truncated": {"stdout": False, "stderr": False},
               "denials": {}}
        att = result.attest(plan, rep, start.base)
        res = result.build(plan, rep, {"cpu_ns": 0, "peak": 0, "ooms": 0}, start.base, attestation=att)
        json.dumps(res.to_dict(include_output=False), separators=(",", ":"))
        # The cgroup reads of the run's loop and end (not memory_peak: on a v2 kernel without
        # memory.peak it polls, and the staging's memory is not the run's).
        cgroup.cpu_usage_ns()
        cgroup.oom_kills()
        cgroup.pids(first_only=True)
    except Exception:  # noqa: BLE001 - only a head start: the run does the same for real
        pass


def _on_sync(ctx: "LayoutContext | None", sync_p: socket.socket, st: _Run, lsock: socket.socket,
             drain: bool = False) -> bool:
    """One message from init, the staging workload or the stub; False at EOF (drain: also
    when nothing is queued)."""
    try:
        data, anc, _flags, _ = sync_p.recvmsg(protocol.MAX_FRAME, socket.CMSG_SPACE(16) + socket.CMSG_SPACE(12),
                                              socket.MSG_CMSG_CLOEXEC | (socket.MSG_DONTWAIT if drain else 0))
    except BlockingIOError:
        return False
    except OSError:            # ECONNRESET: the run was killed (cancel, limit) mid-setup
        data, anc = b"", []
    if not data:
        if st.t_exec_ns is None and st.launch_error is None:
            st.launch_error = LaunchError("sandbox setup ended without a report", step="init").to_dict()
        return False
    fds: list[int] = []
    wpid = None
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4]))
        elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            wpid = struct.unpack("iII", cdata[:12])[0]
    kind, payload = data[:1], data[1:]
    if kind == protocol.ERROR:
        for fd in fds:
            os.close(fd)
        st.launch_error = json.loads(payload)
        return True
    if kind == protocol.STAGED:
        att = json.loads(payload)
        counts = att.get("landlock")
        # init sends the ruleset's counts; what the rules are was decided in the launcher.
        if ctx is None or ctx.landlock_attestation is None:
            att["landlock"] = None
        else:
            att["landlock"] = dict(ctx.landlock_attestation, **(counts or {}))
        st.attestation.update(att)
        st.staged = True
        return True
    if kind == protocol.WAITING:
        st.stub_waiting = True
        return True
    if kind != protocol.EXEC:
        for fd in fds:
            os.close(fd)
        return True
    # "<monotonic ns>\0<status>\0<limits>\0": the stub's read-back after its last step.
    parts = payload.split(b"\0")
    try:
        st.t_exec_ns = int(parts[0])
    except ValueError:
        st.t_exec_ns = time.monotonic_ns()
    att: dict[str, Any] = {"status": parts[1].decode(errors="replace") if len(parts) > 1 else "",
                           "limits": parts[2].decode(errors="replace") if len(parts) > 2 else ""}
    if wpid and st.workload is None:
        # And from outside, when the program is still there to be read (best effort: the
        # stub may have exec'd and the program ended already; once init reported it, the pid
        # may be another process's).
        att["status_outside"] = _read(f"/proc/{wpid}/status")
        att["_wpid"] = wpid
    st.attestation.update(att)
    st.attestation["_listener"] = fds[0] if fds else -1
    return True


def _verify_apparmor(ctx: LayoutContext, st: _Run, kill: Any) -> None:
    """Read the workload's confinement back from the kernel once it has exec'd; a workload not
    confined as planned is killed and the run fails (fail closed)."""
    wpid = st.attestation.get("_wpid")
    if not wpid:
        return
    t = ctx.apparmor_transition
    deadline = time.monotonic() + 0.2
    while True:
        try:
            conf = apparmor.read_confinement(wpid)
        except SandboxError:
            st.attestation["apparmor"] = {"verified": False, "reason": "exited before read-back"}
            return
        try:
            st.attestation["apparmor"] = dict(apparmor.verify(t, conf), verified=True)
            return
        except SandboxError as e:
            # The sync socket closes a moment before the new credentials are committed.
            if time.monotonic() > deadline:
                st.launch_error = e.to_dict()
                kill("APPARMOR")
                return
            time.sleep(0.002)


MAX_DENIAL_NAMES = 256        # distinct syscall names kept in a report; the rest count as "(other)"
DENIAL_BUDGET = 20_000       # notifications answered per run before it is ended as a denial flood


def _on_notify(ctx: LayoutContext, listener: int, st: _Run, kill: Any) -> bool:
    """One seccomp notification: record the syscall by name, then do what the profile said.

    Returns False only when no task can use the filter any more (the listener hung up). A
    notification whose task went away meanwhile (ENOENT: a signal interrupted the call) is
    routine and the listener stays: closing it would turn every later denied syscall into an
    unreported ENOSYS and let a killed call return. Any other failure ends the run (fail closed).
    """
    import errno as _errno
    import select
    # Readable may mean "hung up" (no task uses the filter any more): the receive ioctl would
    # then block forever on some kernels (6.1), so look before receiving.
    p = select.poll()
    p.register(listener, select.POLLIN)
    events = 0
    for _, ev in p.poll(0):
        events |= ev
    if not events & select.POLLIN:
        return not events & (select.POLLHUP | select.POLLERR)
    try:
        n = seccomp.recv_notification(listener)
    except OSError as e:
        if e.errno == _errno.ENOENT:
            return True   # the notifying task went away (interrupted): keep listening
        st.launch_error = LaunchError("seccomp notification receive failed", step="seccomp_notify",
                                      errno=e.errno).to_dict()
        kill("SECCOMP")
        return False
    action, err = ctx.seccomp_compiled.action_for(n.nr)
    name = seccomp.syscall_name(n.nr, n.arch)
    st.denial_count += 1
    if name not in st.denials and len(st.denials) >= MAX_DENIAL_NAMES:
        name = "(other)"             # bounded report: a run cannot grow it past a frame
    entry = st.denials.setdefault(name, [0, action])
    entry[0] += 1
    if action == "kill":
        # No answer: the caller stays blocked in the syscall until the SIGKILL of the whole
        # run lands, so it cannot act on any return value (an EPERM would let it go on).
        kill("SYSCALL_DENIED")
        return True
    if st.denial_count > DENIAL_BUDGET:
        # Each answer costs the supervisor CPU that is not the run's: a flood ends the run.
        st.attestation["denial_flood"] = st.denial_count
        kill("SYSCALL_DENIED")
        return True
    try:
        seccomp.respond(listener, n.id, error=err)
    except OSError:
        pass   # the caller died meanwhile
    return True
