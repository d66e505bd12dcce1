"""The three processes of one run, forked from the launcher.

Theory of operation. The launcher is a single-threaded Python process, so fork() is safe and
the child may run Python until execve. Per run:

  launcher ──fork──> supervisor ──fork──> init (pid 1) ──fork──> workload ──execve──> program

* supervisor (host side): takes the run's host uid/gid (no supplementary groups), unshares
  USER|PID and forks init, usually ahead of time as a spare. The launcher's host worker writes
  init's uid/gid map and puts init into its cgroup; PLACED then lets init go on with what does
  not depend on the run, and CTX hands over the run. The supervisor stays outside the cgroup (its
  work is not charged to the workload) and runs the run's event loop: output pipes -> client
  with caps, seccomp user notifications (denials reported by name), wall/CPU deadlines,
  cancellation, and the final report to the launcher. Killing init kills the whole pid
  namespace, so "kill the run" is one signal.
* init: pid 1 of the run. Phase A (spare): unshares mount, net, ipc, uts and cgroup namespaces
  (cgroup after the placement, so the run sees its own cgroup as /) and forks the workload,
  which waits. Phase B (the run): builds the root filesystem and pivots into it (the waiting
  workload moves with it), hands the context on, forwards signals, reaps orphans, and reports the
  workload's wait status. When it exits the kernel kills everything left in the namespace, so
  no background child outlives the run.
* workload: the containment sequence in `contain_and_exec`, one screen, in order.

Every channel is a CLOEXEC pipe or socket; each process closes what it does not need at once.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import resource
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from sandboxd.errors import LaunchError, SandboxError
from sandboxd.plan import Plan
from sandboxd.runtime import apparmor, caps, landlock, linux, mounts, protocol, seccomp

# Everything the children use is imported here, in the launcher: after pivot_root the package's
# files are out of reach, so a child can import nothing.
import fcntl  # noqa: E402,F401  (place_fds)

SYNC_FD = 3            # the workload's sync socket sits here; seccomp's sendmsg exception names it
OUTPUT_CHUNK = 65536


@dataclass
class RunContext:
    """Everything a run's processes need, made by the launcher and sent to the supervisor.

    It travels pickled over the launcher's own socket to its own forked children (same code,
    same trust), because a supervisor may have been forked before the run existed (a spare).
    Only plain values cross; ctypes structures are built in init from them."""

    plan: Plan
    keep_caps: int
    seccomp_compiled: Any = None        # seccomp.CompiledFilter; None: no filter
    landlock_rules: Any = None          # landlock.LandlockRules; None: no Landlock
    apparmor_transition: Any = None     # apparmor.ExecTransition; None: no profile to apply
    root_mountpoint: str = "/run/sandboxd/root"   # from RuntimeConfig: a host detail, not the plan's
    cgroup: Any = None                  # the run's RunCgroup; the supervisor polls its CPU time
    # Built in init (never pickled): what the workload child installs.
    seccomp_prepared: Any = None
    landlock_prepared: Any = None

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["seccomp_prepared"] = d["landlock_prepared"] = None
        return d


# ---------------------------------------------------------------------------------------------
# workload: the containment order. Each step's position matters; see the comments.
# ---------------------------------------------------------------------------------------------
def contain_and_exec(ctx: RunContext, sync: socket.socket) -> None:
    """Runs in the workload process with stdio and the sync socket already in place (fds 0-3)."""
    plan = ctx.plan
    reset_signals()                                # Python ignores SIGPIPE and SIGXFSZ; programs must not
    os.setsid()                                    # new session: no TIOCSTI into a terminal
    try:
        os.chdir(plan.cwd)
    except OSError as e:
        raise LaunchError("chdir to working directory", step="chdir", path=plan.cwd, errno=e.errno) from None
    apply_rlimits(plan)                            # before caps: lowering needs nothing, raising is gone after
    exe = resolve_executable(plan)                 # inside the new root, before seccomp narrows syscalls
    caps.drop_to(ctx.keep_caps, plan.user.inside_uid, plan.user.inside_gid)
    if ctx.apparmor_transition is not None:        # takes effect at execve; before Landlock, which
        apparmor.apply_exec(ctx.apparmor_transition)   # makes /proc/self read-only
    linux.set_no_new_privs()                       # before Landlock and seccomp: both need it unprivileged,
                                                   # and setuid binaries can no longer regain anything
    landlock_att = None
    if ctx.landlock_prepared is not None:          # after pivot_root: rules name paths of the new root
        landlock_att = landlock.apply(ctx.landlock_prepared)
    att = {"status": _read("/proc/self/status"), "limits": _read("/proc/self/limits"),
           "ns": _ns_ids(), "landlock": landlock_att}
    listener = -1
    if ctx.seccomp_prepared is not None:           # LAST: the filter need not allow our own setup
        listener = seccomp.install_filter(ctx.seccomp_prepared)
    # Hand the listener to the supervisor (sendmsg on SYNC_FD is the one syscall the compiler
    # adds), then wait for its ACK: it reads the cgroup's CPU baseline before we exec.
    protocol.send(sync, protocol.EXEC, att, fds=[listener] if listener >= 0 else ())
    if os.read(SYNC_FD, 1) != protocol.ACK:
        os._exit(126)
    env = {k: v for k, v in plan.env}
    try:
        os.execve(exe, list(plan.argv), env)
    except OSError as e:
        raise LaunchError(f"execve {plan.argv[0]}", step="execve", path=exe, errno=e.errno) from None


def place_fds(stdin_fd: int, out_fd: int, err_fd: int, sync_fd: int) -> socket.socket:
    """stdin/stdout/stderr to 0-2, the sync socket to SYNC_FD, every other fd closed."""
    # Move everything high first so no dup2 can clobber a source that sits on a low number.
    hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in (stdin_fd, out_fd, err_fd, sync_fd)]
    for i in range(3):
        os.dup2(hi[i], i, inheritable=True)
    os.dup2(hi[3], SYNC_FD, inheritable=False)
    linux.close_fds_except((SYNC_FD,))             # nothing of ours leaks into the program
    return socket.socket(fileno=SYNC_FD)


def reset_signals() -> None:
    """Default dispositions and an empty mask, as a program started from a shell expects.

    Ignored signals survive execve: without this a workload inherits Python's SIG_IGN for
    SIGPIPE (writers to a closed pipe spin on EPIPE) and SIGXFSZ (the file size limit would
    become EFBIG instead of the signal the verdict relies on)."""
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass                                   # 32/33: glibc-reserved real-time signals
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def apply_rlimits(plan: Plan) -> None:
    lim = plan.limits
    items = [
        (resource.RLIMIT_CORE, 0),                 # no core files: they leak memory contents and fill disks
        (resource.RLIMIT_STACK, lim.stack_bytes),
        (resource.RLIMIT_FSIZE, lim.file_size_bytes),
        (resource.RLIMIT_NOFILE, lim.open_files),
        # Everything else explicitly, not inherited from the launcher: no locked memory beyond
        # a page-pinning default, no real-time priority, no nice boosts, bounded queues/signals.
        (resource.RLIMIT_MEMLOCK, 64 << 10),
        (resource.RLIMIT_RTPRIO, 0),
        (resource.RLIMIT_NICE, 0),
        (resource.RLIMIT_MSGQUEUE, 800 << 10),
        (resource.RLIMIT_SIGPENDING, 4096),
    ]
    if lim.cpu_time_ms is not None:
        # Backstop per process; the cgroup is the real CPU clock. SIGXCPU at soft, SIGKILL at hard.
        soft = (lim.cpu_time_ms + lim.cpu_extra_ms) // 1000 + 1
        items.append((resource.RLIMIT_CPU, soft))
    if lim.address_space_bytes is not None:
        items.append((resource.RLIMIT_AS, lim.address_space_bytes))
    for res, val in items:
        hard = val + 1 if res == resource.RLIMIT_CPU else val
        try:
            resource.setrlimit(res, (val, hard))
        except (OSError, ValueError) as e:
            raise LaunchError(f"setrlimit {res}={val}", step="rlimits",
                              errno=getattr(e, "errno", None)) from None


def resolve_executable(plan: Plan) -> str:
    name = plan.argv[0]
    if "/" in name:
        return name
    path = dict(plan.env).get("PATH", "/usr/bin:/bin")
    for d in path.split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise LaunchError(f"executable {name!r} not found in PATH {path}", step="execve", path=name, errno=2)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _ns_ids() -> dict[str, str]:
    out = {}
    for ns in ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup"):
        try:
            out[ns] = os.readlink(f"/proc/self/ns/{ns}")
        except OSError:
            out[ns] = "?"
    return out


# ---------------------------------------------------------------------------------------------
# init: pid 1 of the run
# ---------------------------------------------------------------------------------------------
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH)


def init_main(isock: socket.socket, out_w: int, err_w: int, status_w: int,
              sync_c: socket.socket) -> None:
    """pid 1 of the run. Phase A runs ahead of time (a spare): everything that does not depend
    on the plan. Phase B runs when the run's context arrives."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, step="init")
    # -- phase A: the launcher has written our uid/gid map and put us in our cgroup. EOF at any
    # wait below means this spare was retired.
    kind, payload, _ = protocol.recv(isock)
    if kind != protocol.PLACED:
        os._exit(0)
    setup = json.loads(payload)
    wsock_i, wsock_w = protocol.seqpacket_pair()
    try:
        # Become the workload's inside identity (mapped); keep every capability of this user
        # namespace for the setup below. Files we create must have a mapped owner.
        linux.prctl(linux.PR_SET_KEEPCAPS, 1, step="init")
        os.setresgid(setup["gid"], setup["gid"], setup["gid"])
        os.setresuid(setup["uid"], setup["uid"], setup["uid"])
        full = (1 << (caps.last_cap() + 1)) - 1
        linux.capset(full, full, 0)
        flags = linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWCGROUP
        if setup["net"]:
            flags |= linux.CLONE_NEWNET
        linux.unshare(flags)                       # cgroup ns after the placement: the run's cgroup is its /
        # No user namespaces below this one: with it, a workload could get a full set of
        # capabilities there again (only seccomp would stand in the way). The limit is the run's
        # own (user sysctls are per user namespace) and /proc/sys is read-only inside.
        linux.write_file("/proc/sys/user/max_user_namespaces", "0", step="init(max_user_namespaces)")
        if setup["net"]:
            linux.loopback_up()
        os.chdir("/")                              # so pivot_root moves our cwd (and the workload's) too
    except SandboxError as e:
        _report_error(sync_c, e)
        os._exit(125)
    except OSError as e:
        _report_error(sync_c, LaunchError(str(e), step="init", errno=e.errno))
        os._exit(125)
    # The workload process is forked now, sharing every namespace; pivot_root below moves its
    # root and cwd with ours. It waits for the context.
    wpid = os.fork()
    if wpid == 0:
        isock.close()
        wsock_i.close()
        os.close(status_w)
        workload_main(wsock_w, out_w, err_w, sync_c)
    wsock_w.close()
    os.close(out_w)
    os.close(err_w)

    # -- phase B: the run.
    kind, payload, fds = protocol.recv(isock)
    if kind != protocol.CTX or len(fds) != 1:
        os._exit(0)
    stdin_fd = fds[0]
    isock.close()
    ctx: RunContext = pickle.loads(payload)
    plan = ctx.plan
    try:
        linux.sethostname(plan.hostname)
        mounts.build_root(plan.filesystem, ctx.root_mountpoint)
        linux.prctl(linux.PR_SET_DUMPABLE, 0, step="init")  # the workload cannot ptrace or read /proc/1
    except SandboxError as e:
        _report_error(sync_c, e)
        os._exit(125)
    except OSError as e:
        _report_error(sync_c, LaunchError(str(e), step="init", errno=e.errno))
        os._exit(125)
    protocol.send(wsock_i, protocol.CTX, payload, fds=[stdin_fd])
    os.close(stdin_fd)
    wsock_i.close()
    sync_c.close()

    def forward(sig: int, _frame: Any) -> None:
        try:
            os.kill(wpid, sig)
        except OSError:
            pass
    for s in FORWARDED_SIGNALS:
        signal.signal(s, forward)
    # Reap everything; report the workload's own status when it ends, then exit, which makes
    # the kernel kill whatever is left in the pid namespace.
    while True:
        try:
            pid, status, ru = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == wpid:
            t_exit = time.monotonic_ns()
            rep = {"wait_status": status, "utime": ru.ru_utime, "stime": ru.ru_stime,
                   "maxrss_kb": ru.ru_maxrss, "t_exit_ns": t_exit}
            os.write(status_w, json.dumps(rep).encode())
            os._exit(0)


def workload_main(wsock: socket.socket, out_w: int, err_w: int, sync_c: socket.socket) -> None:
    """The workload process until execve; never returns."""
    sync = sync_c
    try:
        kind, payload, fds = protocol.recv(wsock)
        if kind != protocol.CTX or len(fds) != 1:
            os._exit(0)
        ctx: RunContext = pickle.loads(payload)
        if ctx.seccomp_compiled is not None:       # ctypes structures for the last steps
            ctx.seccomp_prepared = seccomp.prepare_install(ctx.seccomp_compiled)
        if ctx.landlock_rules is not None:
            ctx.landlock_prepared = landlock.prepare(ctx.landlock_rules)
        sync = place_fds(fds[0], out_w, err_w, sync_c.fileno())
        contain_and_exec(ctx, sync)
    except SandboxError as e:
        _report_error(sync, e)
    except BaseException as e:  # noqa: BLE001 - the child must never return into the launcher's code
        _report_error(sync, LaunchError(repr(e), step="workload"))
    os._exit(127)


def _report_error(sync: socket.socket, e: SandboxError) -> None:
    try:
        protocol.send(sync, protocol.ERROR, e.to_dict())
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# supervisor
# ---------------------------------------------------------------------------------------------
def supervisor_main(lsock: socket.socket, host_uid: int, host_gid: int) -> None:
    """Runs in the fork of the launcher; never returns."""
    code = 0
    try:
        code = _supervise(lsock, host_uid, host_gid)
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


def _supervise(lsock: socket.socket, host_uid: int, host_gid: int) -> int:
    if os.geteuid() == 0:
        # Become the run's host identity before making its user namespace: the namespace's
        # owner is then the run's uid, so per-user kernel counts of everything inside (inotify
        # instances and watches, message queues, pending signals) are the run's, not host root's.
        os.setgroups([])                           # host root's groups must not follow into the sandbox
        os.setresgid(host_gid, host_gid, host_gid)
        os.setresuid(host_uid, host_uid, host_uid)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, step="supervisor")   # after: a uid change clears it
    linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWPID)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    sync_p, sync_c = protocol.seqpacket_pair()
    sync_p.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # learn the workload's host pid
    isock_p, isock_c = protocol.seqpacket_pair()

    ipid = os.fork()
    if ipid == 0:
        try:
            lsock.close()
            isock_p.close()
            for fd in (out_r, err_r, status_r):
                os.close(fd)
            sync_p.close()
            init_main(isock_c, out_w, err_w, status_w, sync_c)
        finally:
            os._exit(124)
    for fd in (out_w, err_w, status_w):
        os.close(fd)
    sync_c.close()
    isock_c.close()
    pidfd = linux.pidfd_open(ipid)
    protocol.send(lsock, protocol.FORKED, {"init_pid": ipid})
    # The launcher maps init's ids and places it in its cgroup, then says PLACED: init may go
    # on with what does not depend on the run (namespaces, the workload's fork).
    kind, payload, _ = protocol.recv(lsock)
    if kind != protocol.PLACED:
        return 0
    protocol.send(isock_p, protocol.PLACED, payload)

    # Ready. Wait for a run (a spare may wait long); EOF: retired, and init dies with us.
    kind, payload, fds = protocol.recv(lsock)
    if kind != protocol.CTX or len(fds) != 2:
        return 0
    run_sock = socket.socket(fileno=fds[0])
    stdin_fd = fds[1]
    protocol.send(isock_p, protocol.CTX, payload, fds=[stdin_fd])   # init first: it has the work
    os.close(stdin_fd)
    isock_p.close()
    ctx: RunContext = pickle.loads(payload)
    plan = ctx.plan
    lim = plan.limits

    st = _Run()
    sel = selectors.DefaultSelector()
    streams = {out_r: ("stdout", protocol.OUT1, lim.stdout_bytes), err_r: ("stderr", protocol.OUT2, lim.stderr_bytes)}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, "pipe")
    sel.register(status_r, selectors.EVENT_READ, "status")
    sel.register(sync_p, selectors.EVENT_READ, "sync")
    sel.register(run_sock, selectors.EVENT_READ, "client")
    sel.register(pidfd, selectors.EVENT_READ, "init")
    listener = -1
    open_pipes = set(streams)
    init_done = False
    wall_deadline: float | None = None
    cpu_next: float | None = None
    cpu_limit_ns = None if lim.cpu_time_ms is None else (lim.cpu_time_ms + lim.cpu_extra_ms) * 1_000_000
    ncpu = max(1, len(os.sched_getaffinity(0)))
    status_buf = b""

    def kill(reason: str) -> None:
        if st.kill_reason is None:
            st.kill_reason = reason
        linux.pidfd_send_signal(pidfd, signal.SIGKILL)

    def cpu_used() -> int:
        if ctx.cgroup is None or st.cpu_base_ns is None:
            return 0
        return ctx.cgroup.cpu_usage_ns() - st.cpu_base_ns

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

    while not (init_done and not open_pipes and not outbox):
        now = time.monotonic()
        if init_done and outbox:
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
                fd = key.fd
                name, kind, cap = streams[fd]
                try:
                    chunk = os.read(fd, OUTPUT_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_pipes.discard(fd)
                    continue
                room = cap - st.counts[name]
                if len(chunk) > room:
                    chunk = chunk[:max(0, room)]
                    st.truncated[name] = True
                    if plan.output_limit_action == "kill":
                        kill("OUTPUT_LIMIT")
                st.counts[name] += len(chunk)
                if chunk:
                    emit(kind + chunk)
            elif tag == "status":
                data = os.read(status_r, 4096)
                if data:
                    status_buf += data
                else:
                    sel.unregister(status_r)
                    if status_buf:
                        st.workload = json.loads(status_buf)
            elif tag == "sync":
                more = _on_sync(ctx, sync_p, st, lsock)
                if st.t_exec_ns is not None and wall_deadline is None:
                    wall_deadline = time.monotonic() + lim.wall_time_ms / 1000.0
                    cpu_next = time.monotonic() if cpu_limit_ns is not None else None
                if st.attestation.get("_listener", -1) >= 0:
                    listener = st.attestation.pop("_listener")
                    sel.register(listener, selectors.EVENT_READ, "notify")
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
                st.attestation["init_wait_status"] = status
                sel.unregister(pidfd)
                init_done = True
        now = time.monotonic()
        if wall_deadline is not None and now >= wall_deadline and not init_done:
            kill("WALL_TIME_LIMIT")
            wall_deadline = None
        if cpu_next is not None and now >= cpu_next and not init_done:
            used = cpu_used()
            if used >= cpu_limit_ns:
                kill("TIME_LIMIT")
                cpu_next = None
            else:
                # Next look when the remaining budget could be gone if every CPU were spinning.
                cpu_next = now + min(0.1, max(0.002, (cpu_limit_ns - used) / 1e9 / ncpu))
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
    protocol.send(lsock, protocol.REPORT, report)
    return 0


def _on_sync(ctx: RunContext, sync_p: socket.socket, st: _Run, lsock: socket.socket) -> bool:
    """One message from init or the workload; False at EOF."""
    try:
        data, anc, _flags, _ = sync_p.recvmsg(protocol.MAX_FRAME, socket.CMSG_SPACE(16) + socket.CMSG_SPACE(12),
                                              socket.MSG_CMSG_CLOEXEC)
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
        st.launch_error = json.loads(payload)
        return True
    if kind != protocol.EXEC:
        return True
    att = json.loads(payload)
    if wpid:
        # Read back what the kernel says of the workload, from outside it, while it waits.
        status = _read(f"/proc/{wpid}/status")
        att["status_outside"] = status
        att["_wpid"] = wpid
    st.attestation.update(att)
    st.attestation["_listener"] = fds[0] if fds else -1
    if ctx.cgroup is not None:
        st.cpu_base_ns = ctx.cgroup.cpu_usage_ns()
    st.t_exec_ns = time.monotonic_ns()
    try:
        sync_p.send(protocol.ACK)
    except OSError:
        return False           # the workload died before it could exec
    return True


def _verify_apparmor(ctx: RunContext, st: _Run, kill: Any) -> None:
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


def _on_notify(ctx: RunContext, listener: int, st: _Run, kill: Any) -> bool:
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
