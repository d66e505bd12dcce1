"""The launcher: one single-threaded process that forks per run.

Theory of operation. gRPC's Python server is threaded, and fork() in a threaded process may
leave locks held forever in the child, so the daemon never forks. At startup it execs this
module as a fresh interpreter (no grpc imported, no threads ever started) and talks to it over
a CLOEXEC SOCK_SEQPACKET socket. For each RUN frame the launcher, in its event loop:

  1. resolves the plan's layout once per layout (_layout_for: the compiled seccomp filter, the
     Landlock rules without argv[0], the AppArmor transition, the pickled LayoutContext) and
     the run's GO frame for the exec stub (_encode_go);
  2. takes a spare staged for that layout (sandbox.supervisor_main: its own host uid, user and
     pid namespaces, init mapped and placed in a cgroup by the host worker, the root built, the
     workload waiting in sbx-exec), else a generic spare that gets the layout now, else a new
     one; retunes its cgroup (nothing to write when the limits are the layout's), reads the CPU
     baseline, sends GO to the stub and START to the supervisor;
  3. the host worker (host_worker, a second process) does the slow privileged steps: cgroup
     create/place/remove, id maps, network attach/detach; the zygote (zygote_main, a third)
     forks the supervisors, so this process's heap is never shared copy-on-write;
  4. the supervisor sends the result of a run that reached its program straight to the
     client; on its REPORT the launcher answers whatever else (a launch error: ERROR), and on
     its exit removes the cgroup and frees the uid.
Between runs it keeps spares staged for the most recent layouts (_replenish).
Every resource is registered for release in the run's ExitStack the moment it exists, so an
error at any step, a dead supervisor or a launcher shutdown releases it on the same path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from sandboxd.errors import HostCapabilityError, LaunchError, PlanError, SandboxError
from sandboxd.plan import Bind, Limits, Plan, Result, Status
from sandboxd.runtime import caps, hostinfo, linux, protocol, result, sandbox, stubgo
from sandboxd.runtime.config import RuntimeConfig


@dataclass
class _Sup:
    """One supervisor process: a spare waiting for a run, or the supervisor of a run."""

    pid: int
    pidfd: int
    lsock: socket.socket
    stack: contextlib.ExitStack          # the supervisor's resources, then the run's, released together
    host_uid: int
    host_gid: int
    key: tuple[int, int, bool]           # (inside uid, inside gid, own netns): fixed at spawn
    cgroup: Any                          # made at spawn with no limits; the run's limits come later
    layout: "_Layout | None" = None      # what its root is (to be) built for; None: not chosen yet
    layout_sent: bool = False            # LAYOUT sent: init builds the root and stages the workload
    ready: bool = False                  # READY: staged, the stub waits for a run
    go_sock: socket.socket | None = None  # from READY: the supervisor's end of the stub's socket
    retired: bool = False                # killed as a spare no longer wanted
    maps: tuple[str, str] = ("", "")     # the uid_map and gid_map lines written
    init_pid: int | None = None          # set by FORKED
    placed: bool = False                 # init mapped and in its cgroup: ready for a run
    namespaced: bool = False             # NAMESPACED: init has its own namespaces (phase A done)
    run: "_RunState | None" = None
    exited: bool = False
    t_spawn: float = field(default_factory=time.monotonic)


@dataclass
class _Layout:
    """A layout (sandbox.LayoutContext) resolved once: what its spares are built with."""

    key: Any                             # layout_key(plan); None: this run's alone (never shared)
    ctx: sandbox.LayoutContext
    ctx_bytes: bytes                     # pickled once, sent to every spare of the layout
    seccomp_info: dict
    landlock_info: dict
    apparmor_info: dict
    failed: bool = False                 # a spare of it failed to stage: make no more ahead of time
    go_cache: dict = field(default_factory=dict)   # (argv, env, limits) -> (GO frame, Landlock info)
    uses: int = 0                        # runs of it so far


def layout_key(plan: Plan) -> Any:
    """What a spare's prepared state depends on: everything of the plan but the run itself
    (argv, env, limits, stdin, ids). Plans with equal keys can run in each other's spares.
    None: the plan cannot use a prepared spare (a segment's hosts file is fixed per attach)."""
    if plan.network.mode == "segment":
        return None
    return (plan.user, plan.hostname, plan.filesystem, plan.cwd, plan.network,
            tuple(sorted(plan.caps_keep)), plan.seccomp, plan.landlock, plan.apparmor)


@dataclass
class _RunState:
    run_id: str
    plan: Plan
    layout: _Layout
    go: bytes                            # the stub's GO frame
    run_sock: socket.socket
    stdin_fd: int
    cgroup: Any
    report: dict | None = None
    completed: bool = False
    started: bool = False                # START sent to the supervisor
    t_start: float = field(default_factory=time.monotonic)
    seccomp_info: dict = field(default_factory=dict)
    landlock_info: dict | None = None
    cgroup_readback: dict = field(default_factory=dict)
    network: dict | None = None          # segment attach attestation, when the plan has one
    attaching: bool = False              # ATTACH sent to the host worker
    spare: dict = field(default_factory=dict)   # how the run started (see _start)
    apparmor_info: dict = field(default_factory=dict)

    def release_stdin(self) -> None:
        if self.stdin_fd >= 0:
            fd, self.stdin_fd = self.stdin_fd, -1
            os.close(fd)


# Plans remembered by their RUN frame (_plan_of): at most this many, each at most this large.
PLAN_CACHE_ENTRIES = 64
PLAN_CACHE_FRAME_MAX = 64 << 10

# GO frames remembered per layout (_encode_go): at most this many, each at most this large.
GO_CACHE_ENTRIES = 32
GO_CACHE_FRAME_MAX = 16 << 10

# After spares die before their namespaces exist, the next waits this long, doubling each time
# in a row up to the maximum (_spare_failed).
SPARE_RETRY_MIN_S = 0.02
SPARE_RETRY_MAX_S = 5.0

# A spare's cgroup is made with no limits; the run's limits are written when it is taken (in the
# order a fresh cgroup takes them, so v1's memsw >= memory rule holds).
SPARE_LIMITS = Limits(cpu_time_ms=None, memory_bytes=None, pids=None, cpu_quota=None, cpuset=None)


class IdPool:
    """Host uids/gids handed to runs, one per concurrent run (same number for uid and gid)."""

    def __init__(self, start: int, count: int) -> None:
        self.start, self.count = start, count
        self.free = list(range(start + count - 1, start - 1, -1))

    def acquire(self) -> int:
        if not self.free:
            raise SandboxError("no free host uid in the configured range", step="userns",
                               hint="raise uid_range_count or lower concurrency")
        return self.free.pop()

    def release(self, uid: int) -> None:
        self.free.append(uid)


class Launcher:
    def __init__(self, ctl: socket.socket, config: RuntimeConfig) -> None:
        self.ctl = ctl
        self.config = config
        self.sel = selectors.DefaultSelector()
        self.sups: dict[int, _Sup] = {}
        self.host = hostinfo.probe(config)
        self.rootful = os.geteuid() == 0
        self.idmode = self.host["userns"]["id_mapping"]
        self.pool = IdPool(*self.host["userns"]["range"]) if self.host["userns"]["range"] else None
        self._lock_fd = _lock_instance(config)
        self.netcfg = None
        if config.network:
            from sandboxd.network.config import parse_network_config   # pure; no pyroute2
            self.netcfg = parse_network_config(config.network, source="RuntimeConfig.network")
        from sandboxd.runtime import cgroups
        self.cgroups = cgroups.CgroupManager.detect(root=config.cgroup_root, instance=config.instance)
        self.host["cgroups"] = self.cgroups.info()
        self.host["cgroups"]["stale_removed"] = self.cgroups.cleanup_stale()
        try:
            os.makedirs(config.root_mountpoint, exist_ok=True)
            # Init mounts the run's root here as the run's own host uid: it must reach it.
            os.chmod(config.root_mountpoint, 0o755)
        except OSError as e:
            raise HostCapabilityError("cannot create the root mountpoint", step="launcher",
                                      path=config.root_mountpoint, errno=e.errno,
                                      hint="set RuntimeConfig.root_mountpoint to a directory this user can create") from None
        self.host_ns = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in
                        ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")}
        self.stub_fd = stubgo.open_stub(config.exec_stub)
        self._seccomp_cache: dict[tuple, Any] = {}
        self._apparmor_cache: dict[tuple, Any] = {}
        # RUN frames' plans, decoded and checked (_plan_of), most recent last (bounded).
        self._plans: collections.OrderedDict[bytes, Plan] = collections.OrderedDict()
        # Layouts seen, most recent last (bounded): spares are built ahead for the latest ones.
        self._layouts: collections.OrderedDict[Any, _Layout] = collections.OrderedDict()
        self._spawned = 0
        self._spawn_backoff = 0.0              # no spare is made before this time (after a failure)
        self._spare_failures = 0               # spares in a row that died before NAMESPACED
        self._worker_pending = 0
        self.worker, wsock = protocol.seqpacket_pair()
        self.worker_pid = os.fork()
        if self.worker_pid == 0:
            try:
                linux.close_fds_except((wsock.fileno(),))
                linux.set_name(b"sbx-hostworker")
                host_worker(wsock, self.cgroups, self.idmode, config.instance, self.netcfg)
            finally:
                os._exit(1)
        wsock.close()
        # The zygote forks the supervisors. Forking from this process would make every page
        # of its heap copy-on-write while spares live, and each run's work here would then
        # pay a page copy per page it touches (hundreds of faults per run on the hot path).
        self.zygote, zsock = protocol.seqpacket_pair()
        self.zygote_pid = os.fork()
        if self.zygote_pid == 0:
            try:
                linux.close_fds_except((zsock.fileno(), self.stub_fd))
                linux.set_name(b"sbx-zygote")
                zygote_main(zsock, self.stub_fd)
            finally:
                os._exit(1)
        zsock.close()
        # After the worker and the zygote exist: they, and every spare, keep the full set.
        self.avoid_cpu = _pin_self() if config.spread_cpus else ""

    # -- main loop -----------------------------------------------------------------------------
    def serve(self) -> None:
        self.sel.register(self.ctl, selectors.EVENT_READ, ("ctl", None))
        self.sel.register(self.worker, selectors.EVENT_READ, ("worker", None))
        protocol.send(self.ctl, protocol.GO, {"host": self.host})
        while True:
            events = self.sel.select(self._next_timeout())
            for key, _ in events:
                tag, sup = key.data
                if tag == "ctl":
                    if not self._on_ctl():
                        self.shutdown()
                        return
                    continue
                if tag == "worker":
                    self._on_worker()      # the worker is ours; its failure is the launcher's
                    continue
                if tag == "deliver":
                    self._on_deliver(key.fileobj, sup)
                    continue
                try:
                    if tag == "lsock":
                        self._on_lsock(sup)
                    elif tag == "pidfd":
                        self._on_exit(sup)
                except Exception as e:  # noqa: BLE001 - one run's trouble must not end the others
                    self._fail_sup(sup, e)
            self._check_stuck()
            if not events:
                self._replenish()      # spares are made when nothing else is waiting

    def _fail_sup(self, sup: _Sup, e: BaseException) -> None:
        """Whatever went wrong with one supervisor's channel (a bug, a hostile report) ends that
        supervisor and its run with an error; the launcher and every other run go on."""
        print(f"sandboxd-launcher: supervisor {sup.pid}: {e!r}", file=sys.stderr)
        if sup.run is not None and sup.run.report is None:
            sup.run.report = {"launch_error": LaunchError(f"supervisor channel failed: {e!r}",
                                                          step="supervisor").to_dict()}
        linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)
        self._unregister(sup.lsock)

    def _want_spare(self) -> bool:
        """Below the spare target, and no run is being set up unless we ran out entirely: making
        a spare takes a CPU from the runs starting now (two cores here), so it waits for them."""
        idle = len(self._idle_spares())
        if idle >= self._spare_target():
            return False
        starting = any(s.run is not None and not s.run.completed for s in self.sups.values())
        return idle == 0 or not starting

    def _spare_target(self) -> int:
        # `prefork` spares built for recent layouts, plus one generic spare (namespaces only)
        # for a run whose layout is new.
        return self.config.prefork + 1 if self.config.prefork else 0

    def _next_timeout(self) -> float | None:
        if self._want_spare():
            return max(0.0, self._spawn_backoff - time.monotonic())
        return 1.0 if self.sups else None

    def _idle_spares(self) -> list[_Sup]:
        return [s for s in self.sups.values() if s.run is None and not s.exited and not s.retired]

    DEFAULT_KEY = (1000, 1000, True)   # the default plan's inside ids, with its own netns

    def _wanted_layouts(self) -> list[_Layout | None]:
        """What the idle spares should be built for: the latest layouts that recur, newest
        first, one spare each, the rest for the newest; and one generic spare."""
        # Only layouts that recur: a layout seen once (a per-request work directory or bind)
        # would only cost a spare that no run takes.
        recent = [lay for lay in reversed(self._layouts.values())
                  if lay.key is not None and not lay.failed and lay.uses >= 2][: self.config.prefork]
        want: list[_Layout | None] = list(recent)
        while recent and len(want) < self.config.prefork:
            want.append(recent[0])
        while len(want) < self._spare_target():
            want.append(None)
        return want

    def _replenish(self) -> None:
        idle = self._idle_spares()
        want = collections.Counter(id(lay) if lay else None for lay in self._wanted_layouts())
        have = collections.Counter(id(s.layout) if s.layout else None for s in idle)
        missing = [lay for lay in self._wanted_layouts() if lay is not None
                   and have[id(lay)] < want[id(lay)]]
        generic = [s for s in idle if s.layout is None]
        if missing and len(generic) > want[None]:
            # A generic spare more than wanted: stage it for a layout that lacks one.
            sup = min(generic, key=lambda s: s.t_spawn)
            sup.layout = missing[0]
            self._advance(sup)
            return
        if len(idle) >= self._spare_target():
            # Enough spares, but some may be for layouts no longer wanted (or more of one
            # layout than wanted): retire the oldest surplus one; a later pass makes what is
            # missing instead.
            surplus = [s for s in idle if s.layout is not None
                       and have[id(s.layout)] > want.get(id(s.layout), 0)]
            if surplus and have != want:
                self._retire(min(surplus, key=lambda s: s.t_spawn))
            return
        if not self._want_spare() or time.monotonic() < self._spawn_backoff:
            return
        for lay in self._wanted_layouts():
            k = id(lay) if lay else None
            if have[k] > 0:
                have[k] -= 1
                continue
            try:
                ns_key = self._ns_key(lay.ctx.plan) if lay else self.DEFAULT_KEY
                sup = self._spawn(ns_key)
                sup.layout = lay
            except (SandboxError, OSError) as e:
                # Whatever keeps failing (no free uid, fork refused) is not retried at once:
                # the loop would spin on it.
                self._spawn_backoff = time.monotonic() + 1.0
                print(f"sandboxd-launcher: cannot make a spare: {e}", file=sys.stderr)
            return

    @staticmethod
    def _ns_key(plan: Plan) -> tuple[int, int, bool]:
        return (plan.user.inside_uid, plan.user.inside_gid, plan.network.mode != "host")

    def _check_stuck(self) -> None:
        # Safety net: a supervisor that outlives its wall limit by far is killed with its run.
        now = time.monotonic()
        for sup in list(self.sups.values()):
            if sup.run is not None and not sup.exited:
                budget = float(sup.run.plan.limits.wall_time_ms) / 1000.0 + 30.0
                if now - sup.run.t_start > budget:
                    linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)

    def _on_ctl(self) -> bool:
        try:
            kind, payload, fds = protocol.recv(self.ctl)
        except OSError:
            return False
        if kind == b"":
            return False
        if kind == protocol.RUN:
            run_fd, stdin_fd = (fds + [-1, -1])[:2]
            run_sock = socket.socket(fileno=run_fd)
            try:
                self._start(payload, run_sock, stdin_fd)
            except SandboxError as e:
                _send_quiet(run_sock, protocol.ERROR, e.to_dict())
                run_sock.close()
                _close_quiet(stdin_fd)
            except Exception as e:  # noqa: BLE001 - a bug must not take the launcher down
                _send_quiet(run_sock, protocol.ERROR, LaunchError(repr(e), step="launcher").to_dict())
                run_sock.close()
                _close_quiet(stdin_fd)
        return True

    # -- supervisors ---------------------------------------------------------------------------
    def _spawn(self, key: tuple[int, int, bool]) -> _Sup:
        """Fork a supervisor (which unshares USER|PID and forks init) with an empty cgroup.

        Everything here is independent of the run, so it happens ahead of time for spares:
        the forks, the cgroup (v1 moves cost an RCU grace period each), the id maps, the
        namespaces. A run then only sets its limits and hands over its context."""
        self._spawned += 1
        stack = contextlib.ExitStack()
        try:
            if self.pool is not None:
                uid = self.pool.acquire()
                gid = uid
            else:
                uid, gid = os.geteuid(), os.getegid()
            holder: list[_Sup] = []
            # Last out: the host id is free again only once the cgroup is gone (nothing of the
            # run can still be running under it).
            stack.callback(lambda: self._release_host(holder[0] if holder else None, uid))
            # The zygote forks it and hands back its socket and a pidfd (opened before the
            # zygote could reap it: the pid cannot have been reused).
            protocol.send(self.zygote, protocol.SPAWN, {"uid": uid, "gid": gid})
            kind, payload, fds = protocol.recv(self.zygote)
            if kind != protocol.SPAWNED or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                err = protocol.loads(payload) if kind == protocol.ERROR else None
                raise SandboxError.from_dict(err) if err else LaunchError("the zygote is gone", step="spare")
            lsock_l = socket.socket(fileno=fds[0])
            pidfd = fds[1]
            pid = protocol.loads(payload)["pid"]
            stack.callback(lsock_l.close)
            stack.callback(_reap, pid, pidfd)
        except BaseException:
            stack.close()
            raise
        sup = _Sup(pid=pid, pidfd=pidfd, lsock=lsock_l, stack=stack, host_uid=uid, host_gid=gid,
                   key=key, cgroup=None)
        holder.append(sup)
        self.sups[pid] = sup
        self.sel.register(lsock_l, selectors.EVENT_READ, ("lsock", sup))
        self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", sup))
        stack.callback(self._unregister, pidfd)
        stack.callback(self._unregister, lsock_l)
        return sup

    def _release_host(self, sup: "_Sup | None", uid: int) -> None:
        cg = sup.cgroup if sup is not None else None
        if cg is None:
            if self.pool is not None:
                self.pool.release(uid)
            return
        self._worker_send(protocol.REMOVE, {"cg": cg, "uid": uid})

    def _take_spare(self, plan: Plan, layout: _Layout) -> _Sup:
        """A spare built for this layout (staged ones first), else a generic one (which gets
        the layout now), else a new one."""
        ns_key = self._ns_key(plan)
        idle = [s for s in self._idle_spares() if s.key == ns_key]
        if layout.key is not None:
            same = [s for s in idle if s.layout is not None and s.layout.key == layout.key]
            if same:
                return min(same, key=lambda s: (not s.ready, s.t_spawn))
        generic = [s for s in idle if s.layout is None]
        sup = min(generic, key=lambda s: (not s.placed, s.t_spawn)) if generic else self._spawn(ns_key)
        sup.layout = layout
        return sup

    # -- one run -------------------------------------------------------------------------------
    def _start(self, payload: bytes, run_sock: socket.socket, stdin_fd: int) -> None:
        check_stdin(stdin_fd)
        plan = self._plan_of(payload)
        if plan.user.uid_mode == "per_run" and self.pool is None and not plan.user.allow_single_uid:
            raise HostCapabilityError(
                "plan requires a per-run host uid but this launcher can only map its own uid",
                step="userns", hint="run as root, or give the user a /etc/subuid range and install uidmap")
        layout = self._layout_for(plan)
        layout.uses += 1
        go, landlock_info = self._encode_go(plan, layout)
        sup = self._take_spare(plan, layout)
        try:
            self._bind_run(sup, plan, layout, go, landlock_info, run_sock, stdin_fd)
        except BaseException:
            if sup.run is None and not sup.layout_sent:
                sup.layout = None          # stays generic: the failed run's layout is not its own
            raise

    def _plan_of(self, payload: bytes) -> Plan:
        """The RUN frame's plan, decoded and checked; remembered by its bytes (bounded), since a
        judge or a service sends the same plan run after run and decoding it is the largest
        part of this process's work on a run's path (~0.15 ms of ~0.5, measured). Plans are
        frozen and every check is a function of the plan and this launcher's fixed
        configuration, so an equal frame needs neither again."""
        hit = self._plans.get(payload)
        if hit is not None:
            self._plans.move_to_end(payload)
            return hit
        try:
            plan = pickle.loads(payload)
        except Exception as e:  # noqa: BLE001 - whatever a bad pickle raises
            raise PlanError(f"malformed plan: {e!r}", step="plan") from None
        if not isinstance(plan, Plan):
            raise PlanError(f"expected a Plan, got {type(plan).__name__}", step="plan")
        check_plan_values(plan)
        self._check_plan(plan)
        if len(payload) <= PLAN_CACHE_FRAME_MAX:
            self._plans[payload] = plan
            while len(self._plans) > PLAN_CACHE_ENTRIES:
                self._plans.popitem(last=False)
        return plan

    def _bind_run(self, sup: _Sup, plan: Plan, layout: _Layout, go: bytes, landlock_info: dict,
                  run_sock: socket.socket, stdin_fd: int) -> None:
        # How the run started: in a spare already staged for its layout (the fast path), or
        # one that still had to build its root for it.
        spare_info = {"staged": sup.ready, "layout_shared": layout.key is not None}
        run_id = plan.run_id or f"{os.getpid()}-{time.monotonic_ns()}"
        run = _RunState(run_id=run_id, plan=plan, layout=layout, go=go, run_sock=run_sock,
                        stdin_fd=stdin_fd, cgroup=None, seccomp_info=layout.seccomp_info,
                        landlock_info=landlock_info, apparmor_info=layout.apparmor_info,
                        spare=spare_info)
        if plan.filesystem.work_host_path:     # everything that can fail, before the run is attached
            try:
                os.chown(plan.filesystem.work_host_path, sup.host_uid, sup.host_gid)
            except OSError as e:
                raise LaunchError("give the work directory to the run's uid", step="work_dir",
                                  path=plan.filesystem.work_host_path, errno=e.errno) from None
        sup.run = run
        sup.stack.callback(run.release_stdin)   # by reference: the fd may be handed over earlier
        if sup.layout_sent and not sup.ready:
            # Still staging: it need not warm up for a run that may come (this one waits).
            try:
                protocol.send(sup.lsock, protocol.HURRY)
            except OSError:
                pass                             # gone: its exit answers the run
        self._advance(sup)

    def _layout_for(self, plan: Plan, *, shared: bool = True) -> _Layout:
        """The plan's layout, resolved once per key (seccomp compiled, Landlock rules without
        argv[0], AppArmor profile loaded, the context pickled). shared=False: this run's own."""
        key = layout_key(plan) if shared else None
        if key is not None:
            hit = self._layouts.get(key)
            if hit is not None:
                self._layouts.move_to_end(key)
                return hit
        # The layout's plan without the run's own parts: every later spare of the layout (and
        # the init of every later run) holds it, and another run's argv and env are not theirs.
        lplan = dataclasses.replace(plan, argv=("-",), env=(), run_id="")
        ctx = sandbox.LayoutContext(plan=lplan, keep_caps=caps.parse_caps(plan.caps_keep),
                                    root_mountpoint=self.config.root_mountpoint,
                                    avoid_cpu=self.avoid_cpu)
        lay = _Layout(key=key, ctx=ctx, ctx_bytes=b"",
                      seccomp_info=self._prepare_seccomp(plan, ctx),
                      landlock_info=self._prepare_landlock(plan, ctx),
                      apparmor_info=self._prepare_apparmor(plan, ctx))
        self._encode_layout(lplan, ctx)
        lay.ctx_bytes = pickle.dumps(ctx, protocol=pickle.HIGHEST_PROTOCOL)
        if len(lay.ctx_bytes) + 1 > protocol.MAX_FRAME:
            raise PlanError(f"sandbox layout too large ({len(lay.ctx_bytes)} bytes pickled, at most "
                            f"{protocol.MAX_FRAME - 1})", step="plan")
        if key is not None:
            self._layouts[key] = lay
            while len(self._layouts) > 16:
                self._layouts.popitem(last=False)
        return lay

    @staticmethod
    def _encode_layout(plan: Plan, ctx: sandbox.LayoutContext) -> None:
        """What init builds the sandbox from (once per layout): the root's ops, the identity,
        the capabilities kept and the Landlock ruleset, as the blob init parses."""
        from sandboxd.runtime import mounts
        prepared = None
        if ctx.landlock_rules is not None:
            from sandboxd.runtime import landlock
            prepared = landlock.prepare(ctx.landlock_rules)
            ctx.landlock_attestation = prepared.attestation
        ctx.layout_blob = stubgo.encode_layout(
            root=ctx.root_mountpoint, hostname=plan.hostname, cwd=plan.cwd,
            uid=plan.user.inside_uid, gid=plan.user.inside_gid, keep_caps=ctx.keep_caps,
            cpu_arg=ctx.avoid_cpu, landlock=prepared,
            ops=mounts.compile_root(plan.filesystem, ctx.root_mountpoint))

    def _encode_go(self, plan: Plan, layout: _Layout) -> tuple[bytes, dict]:
        """The run's part: the stub's GO frame, and the Landlock attestation with argv[0]'s rule.

        Remembered per layout by what it is made of (argv, env, limits): a judge runs the same
        program with the same limits on test after test (stdin is not in the frame)."""
        key = (plan.argv, plan.env, plan.limits)
        hit = layout.go_cache.get(key)
        if hit is not None:
            return hit
        from sandboxd.runtime import landlock
        ctx = layout.ctx
        rules = ctx.landlock_rules
        rule = None
        if rules is not None:
            rule = landlock.exec_rule(rules, plan.argv[0], plan.filesystem.symlinks)
        comp = ctx.seccomp_compiled
        go = stubgo.encode(plan, bpf=comp.bpf if comp is not None else None,
                           seccomp_flags=comp.install_flags if comp is not None else 0,
                           landlock=rules is not None and rules.enforce, exec_rule=rule,
                           apparmor=ctx.apparmor_transition)
        info = layout.landlock_info
        if rule is not None:
            info = dict(info, exec_rule={"path": rule[0], "access": landlock.fs_names(rule[1])})
        if len(go) <= GO_CACHE_FRAME_MAX:
            while len(layout.go_cache) >= GO_CACHE_ENTRIES:
                layout.go_cache.pop(next(iter(layout.go_cache)))
            layout.go_cache[key] = (go, info)
        return go, info

    def _advance(self, sup: _Sup) -> None:
        """Move a placed supervisor on: its layout (LAYOUT), then, once it is staged (READY),
        its run (GO to the stub, START to the supervisor)."""
        if not sup.placed:
            return                   # the host worker's PREPARE answer brings us back here
        run = sup.run
        if run is not None and run.plan.network.mode == "segment" and run.network is None:
            # Once init has made the run's network namespace (NAMESPACED: before that,
            # /proc/<init>/ns/net is the host's), the worker plugs it into the segment; the
            # layout follows when it answers (the segment's hosts file is part of it).
            if not sup.namespaced or run.attaching:
                return
            run.attaching = True
            self._worker_send(protocol.ATTACH, {"sup": sup.pid, "run_id": run.run_id,
                                                "netns": f"/proc/{sup.init_pid}/ns/net",
                                                "plan": run.plan.network, "name": run.plan.hostname})
            return
        try:
            if not sup.layout_sent and sup.layout is not None:
                protocol.send(sup.lsock, protocol.LAYOUT, sup.layout.ctx_bytes)
                protocol.send(sup.lsock, protocol.LAYOUT_BLOB, sup.layout.ctx.layout_blob)
                if run is not None:
                    protocol.send(sup.lsock, protocol.HURRY)
                sup.layout_sent = True
                if run is None:
                    # Limits as the layout's first run had them: a run with the same limits
                    # (the usual case) then writes nothing to the cgroup at its start.
                    self.cgroups.retune(sup.cgroup, sup.layout.ctx.plan.limits)
            if run is None or run.started or sup.go_sock is None:
                return                   # READY brings us back here
            run.started = True
            run.cgroup = sup.cgroup
            run.cgroup_readback = self.cgroups.retune(sup.cgroup, run.plan.limits)
            run.cgroup_readback = dict(run.cgroup_readback, peak_reset_at_start=sup.cgroup.reset_peak())
            # GO, then START: straight to the stub, which finishes the containment and execs
            # (no hop through the supervisor); the supervisor learns of the run in the same
            # breath. The CPU baseline is read before GO, so the stub's microseconds count as
            # the run's. START is ready before GO: the woken stub may take this CPU at once.
            start = sandbox.RunStart(limits=run.plan.limits, output_limit_action=run.plan.output_limit_action,
                                     cpu_base_ns=sup.cgroup.cpu_usage_ns(),
                                     t_go_ns=time.monotonic_ns(), base=self._attest_base(sup))
            start_bytes = pickle.dumps(start, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                protocol.send_raw(sup.go_sock, run.go, fds=[run.stdin_fd])
            except OSError as e:
                raise LaunchError("the staged spare is gone (its stub did not take the run)",
                                  step="dispatch", errno=e.errno) from None
            protocol.send(sup.lsock, protocol.START, start_bytes, fds=[run.run_sock.fileno()])
            sup.go_sock.close()
            sup.go_sock = None
        except (SandboxError, OSError) as e:
            err = e if isinstance(e, SandboxError) else LaunchError(str(e), step="dispatch", errno=e.errno)
            if run is not None:
                run.report = {"launch_error": err.to_dict()}
            linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)
            return
        run.release_stdin()          # the supervisor has its copy now

    def _spare_failed(self) -> None:
        """A spare died before it had its namespaces (phase A). Whatever made it fail (a host
        limit, a broken setup) will most likely make the next one fail too: wait before the
        next, longer each time in a row (20 ms doubling up to 5 s), or the loop would spin
        making spares that die (hundreds a second, measured) and take the CPU from the runs.
        A run never waits for this: without an idle spare it makes its own supervisor."""
        self._spare_failures += 1
        delay = min(SPARE_RETRY_MIN_S * 2 ** (self._spare_failures - 1), SPARE_RETRY_MAX_S)
        self._spawn_backoff = max(self._spawn_backoff, time.monotonic() + delay)

    def _retire(self, sup: _Sup) -> None:
        sup.retired = True
        linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)

    def _check_plan(self, plan: Plan) -> None:
        if not plan.argv:
            raise PlanError("argv is empty", step="plan")
        if plan.network.mode == "segment":
            if self.netcfg is None:
                raise HostCapabilityError("network mode 'segment' but this launcher has no segments configured",
                                          step="network", hint="configure RuntimeConfig.network")
            from sandboxd.network.config import check_plan
            check_plan(plan.network, self.netcfg)       # unknown segment: PlanError
        elif plan.network.mode not in ("none", "host"):
            raise PlanError(f"unknown network mode {plan.network.mode!r}", step="network")
        from sandboxd.runtime import apparmor
        apparmor.check_plan(plan.apparmor, self.host["apparmor"])   # required but impossible: refused

    def _prepare_seccomp(self, plan: Plan, ctx: sandbox.LayoutContext) -> dict:
        if plan.seccomp is None:
            return {"enabled": False}
        from sandboxd.runtime import seccomp
        sp = plan.seccomp
        key = (sp.path, sp.sha256, tuple(sorted(plan.caps_keep)), sp.report_denials)
        hit = self._seccomp_cache.get(key)
        if hit is None:
            digest = _sha256_file(sp.path)
            if digest != sp.sha256:
                raise HostCapabilityError(
                    f"seccomp profile {sp.name!r} changed on disk since the plan was made "
                    f"(plan sha256 {sp.sha256[:12]}, file {digest[:12]})", step="seccomp", path=sp.path)
            prof = seccomp.load_profile(sp.path)
            compiled = seccomp.compile_profile(prof, caps_keep=tuple(plan.caps_keep),
                                               report_denials=sp.report_denials, sync_fd=sandbox.SYNC_FD)
            self._seccomp_cache[key] = hit = compiled
        compiled = hit
        ctx.seccomp_compiled = compiled
        return {"enabled": True, "profile": sp.name, "profile_sha256": sp.sha256,
                "bpf_sha256": compiled.sha256, "report_denials": sp.report_denials,
                "uses_notify": compiled.uses_notify, "unenforced": list(compiled.unenforced)}

    def _prepare_landlock(self, plan: Plan, ctx: sandbox.LayoutContext) -> dict | None:
        if not plan.landlock.enabled:
            return {"enabled": False}
        try:
            from sandboxd.runtime import landlock
        except ImportError:
            if plan.landlock.mode == "required":
                raise HostCapabilityError("Landlock support is not built into this runtime", step="landlock")
            return {"enabled": False, "reason": "not built"}
        abi = self.host["landlock"]["abi"]
        # Per layout (cached with it): argv[0]'s own rule is the run's (see _encode_go).
        rules = landlock.resolve_parts(plan.filesystem, plan.landlock, plan.network.mode, abi)
        ctx.landlock_rules = rules
        return {"enabled": True, "abi": abi, "mode": plan.landlock.mode,
                "unenforced": list(getattr(rules, "unenforced", []))}

    def _prepare_apparmor(self, plan: Plan, ctx: sandbox.LayoutContext) -> dict:
        """Decide, load the profile if needed (once per profile and mode: the parser is slow),
        and give the workload its exec transition."""
        from sandboxd.runtime import apparmor
        key = (plan.apparmor.profile, plan.apparmor.mode, plan.apparmor.required)
        prep = self._apparmor_cache.get(key)
        if prep is None:
            prep = apparmor.prepare(plan.apparmor, support=self.host["apparmor"])
            if plan.apparmor.profile is not None:
                self._apparmor_cache[key] = prep
        ctx.apparmor_transition = prep.transition
        return dict(prep.report)

    @staticmethod
    def _close_go_sock(sup: _Sup) -> None:
        if sup.go_sock is not None:
            sup.go_sock.close()
            sup.go_sock = None

    def _on_lsock(self, sup: _Sup) -> None:
        try:
            kind, payload, fds = protocol.recv(sup.lsock)
        except OSError:
            kind, payload, fds = b"", b"", []
        if kind == protocol.FORKED:
            sup.init_pid = protocol.loads(payload)["init_pid"]
            uid_map = f"{sup.key[0]} {sup.host_uid} 1"
            gid_map = f"{sup.key[1]} {sup.host_gid} 1"
            sup.maps = (uid_map, gid_map)
            # The slow, privileged part (cgroup made, init moved into it: an RCU grace period
            # each on v1; maps written) runs in the host worker so this loop stays responsive.
            self._worker_send(protocol.PREPARE, {"sup": sup.pid, "init_pid": sup.init_pid,
                                                 "name": f"{os.getpid()}-{self._spawned}-{sup.pid}",
                                                 "uid_map": uid_map, "gid_map": gid_map})
        elif kind == protocol.NAMESPACED:
            sup.namespaced = True
            self._spare_failures = 0
            self._advance(sup)
        elif kind == protocol.READY:
            sup.ready = True
            if fds:
                sup.go_sock = socket.socket(fileno=fds[0])
                sup.stack.callback(self._close_go_sock, sup)
                self._advance(sup)
        elif kind == protocol.REPORT:
            if sup.run is not None:
                if sup.run.report is None:
                    sup.run.report = protocol.loads(payload)
                self._complete(sup)
            else:
                # A spare failed to stage its layout. Say so, and make no more spares for it
                # ahead of time: a run of that layout would meet the same error, as its own.
                err = (protocol.loads(payload) or {}).get("launch_error") or {}
                print(f"sandboxd-launcher: spare failed to stage: {err.get('message')} "
                      f"(step {err.get('step')}, errno {err.get('errno')})", file=sys.stderr)
                if sup.layout is not None and sup.namespaced:   # not phase A's failure
                    sup.layout.failed = True
                if not sup.namespaced:
                    self._spare_failed()
                self._retire(sup)
        elif kind == b"":
            self._unregister(sup.lsock)
        if kind != protocol.READY:
            for fd in fds:
                _close_quiet(fd)

    def _unregister(self, obj: Any) -> None:
        try:
            self.sel.unregister(obj)
        except (KeyError, ValueError):
            pass

    # -- the host worker -----------------------------------------------------------------------
    def _worker_send(self, kind: bytes, req: dict) -> None:
        protocol.send(self.worker, kind, pickle.dumps(req))
        self._worker_pending += 1

    def _on_worker(self) -> None:
        kind, payload, _ = protocol.recv(self.worker)
        if kind == b"":
            raise SandboxError("the host worker died", step="launcher")
        self._worker_pending -= 1
        rep = pickle.loads(payload)
        if kind == protocol.REMOVE:
            if rep.get("error"):
                # Something of the run may still live under its host id: never hand it out again.
                print(f"sandboxd-launcher: cgroup cleanup: {rep['error']}; host id {rep['uid']} "
                      "quarantined", file=sys.stderr)
            elif self.pool is not None and rep.get("uid") is not None:
                self.pool.release(rep["uid"])
            return
        if kind == protocol.DETACH:
            if rep.get("error"):
                print(f"sandboxd-launcher: network detach: {rep['error']}", file=sys.stderr)
            return
        sup = self.sups.get(rep["sup"])
        if kind == protocol.ATTACH:
            self._on_attached(sup, rep)
            return
        if sup is None or sup.exited:
            if rep.get("cg") is not None:   # the supervisor died meanwhile: nothing will remove it
                self._worker_send(protocol.REMOVE, {"cg": rep["cg"], "uid": None})
            return
        if rep.get("error"):
            err = SandboxError.from_dict(rep["error"])
            if sup.run is not None:
                sup.run.report = {"launch_error": err.to_dict()}
            else:
                print(f"sandboxd-launcher: spare failed: {err}", file=sys.stderr)
            linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)
            return
        sup.cgroup = rep["cg"]
        uid, gid, net = sup.key
        try:
            protocol.send(sup.lsock, protocol.PLACED, pickle.dumps(
                {"uid": uid, "gid": gid, "net": net, "cgroup": sup.cgroup}, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)
            return
        sup.placed = True
        self._advance(sup)

    def _on_attached(self, sup: "_Sup | None", rep: dict) -> None:
        if rep.get("error") is None and rep.get("attestation", {}).get("mode") == "segment":
            run_id = rep["run_id"]
            if sup is None or sup.exited or sup.run is None:
                self._worker_send(protocol.DETACH, {"run_id": run_id})
                return
            sup.stack.callback(self._worker_send, protocol.DETACH, {"run_id": run_id})
        if sup is None or sup.exited or sup.run is None:
            return
        run = sup.run
        if rep.get("error"):
            run.report = {"launch_error": rep["error"]}
            linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)
            return
        run.network = rep["attestation"]
        hosts = run.network.get("hosts_file")
        if hosts:
            # The segment's hosts file (kept current by the worker, in place) replaces the
            # generated /etc/hosts, so members find each other by name.
            fs = run.plan.filesystem
            plan = dataclasses.replace(run.plan, filesystem=dataclasses.replace(
                fs, files=tuple(f for f in fs.files if f[0] != "/etc/hosts"),
                binds=fs.binds + (Bind(source=hosts, target="/etc/hosts"),)))
            run.plan = plan
        # The segment's layout is this run's alone: resolved now, with the hosts file in it.
        run.layout = sup.layout = self._layout_for(run.plan, shared=False)
        run.go, run.landlock_info = self._encode_go(run.plan, run.layout)
        self._advance(sup)

    def _on_exit(self, sup: _Sup) -> None:
        """The supervisor is gone: answer the client if not done yet, then release everything."""
        sup.exited = True
        run = sup.run
        if run is None and not sup.retired and not sup.namespaced:
            self._spare_failed()          # died before its namespaces existed, unasked
        if run is not None:
            # Drain a REPORT that may still be queued behind the exit.
            while run.report is None:
                try:
                    kind, payload, _ = protocol.recv(sup.lsock)
                except (BlockingIOError, OSError):
                    break
                if kind == protocol.REPORT:
                    run.report = protocol.loads(payload)
                elif kind == b"":
                    break
            self._complete(sup)
        self.sups.pop(sup.pid, None)
        errors = _close_stack(sup.stack)
        if errors:
            print(f"sandboxd-launcher: cleanup of supervisor {sup.pid}: {errors}", file=sys.stderr)

    def _complete(self, sup: _Sup) -> None:
        """Send the result (or the error) as soon as the supervisor has reported.

        The supervisor reports after init was reaped, and the kernel reaps every process of the
        pid namespace before init's exit completes, so the cgroup's numbers are final here. The
        supervisor's own exit and the release of the run's resources follow without the client
        waiting for them."""
        run = sup.run
        if run is None or run.completed:
            return
        run.completed = True
        if run.report and run.report.get("delivered"):
            # The supervisor sent the result itself; what is left is the cleanup when it exits.
            run.layout.failed = False          # it staged and ran: worth staging ahead again
            run.run_sock.close()
            return
        try:
            frame, body = self._finish(sup)
        except SandboxError as e:
            frame, body = protocol.ERROR, e.to_dict()
        except Exception as e:  # noqa: BLE001
            frame, body = protocol.ERROR, LaunchError(repr(e), step="collect").to_dict()
        self._deliver(run.run_sock, frame + json.dumps(body, separators=(",", ":")).encode())

    def _deliver(self, sock: socket.socket, data: bytes) -> None:
        """Send a run's last frame without ever blocking the loop on a slow client: if its
        socket is full, the frame waits for write readiness."""
        sock.setblocking(False)
        try:
            sock.sendmsg([data])
        except BlockingIOError:
            self.sel.register(sock, selectors.EVENT_WRITE, ("deliver", data))
            return
        except OSError:
            pass           # the client is gone
        sock.close()

    def _on_deliver(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendmsg([data])
        except BlockingIOError:
            return
        except OSError:
            pass
        self._unregister(sock)
        sock.close()

    def _finish(self, sup: _Sup) -> tuple[bytes, dict]:
        run = sup.run
        assert run is not None
        rep = run.report or {}
        cg = run.cgroup
        if cg is None:
            # The run never got its context (a failure while preparing it: network attach, the
            # cgroup's limits): there is nothing of the workload to measure.
            if rep.get("launch_error"):
                raise SandboxError.from_dict(rep["launch_error"])
            raise LaunchError("the sandbox ended before the run was handed over", step="dispatch")
        # Read the cgroup before anything else can change it, then kill what is left.
        cpu_total = cg.cpu_usage_ns()
        peak = cg.memory_peak()
        ooms = cg.oom_kills()
        cg.kill_all()
        if rep.get("cancelled") and rep.get("t_exec_ns") is None:
            # Cancelled while still being set up: a cancelled run, not a sandbox failure.
            return protocol.RESULT, Result(status=Status.CANCELLED, killed_by_sandbox=True,
                                           kill_reason="CANCELLED",
                                           attestation={"phase": "before exec"}).to_dict(include_output=False)
        if rep.get("launch_error"):
            raise SandboxError.from_dict(rep["launch_error"])
        if rep.get("t_exec_ns") is None:
            raise LaunchError("the sandbox ended before the program started", step="supervisor")
        numbers = {"cpu_ns": cpu_total, "peak": peak, "ooms": ooms}
        return protocol.RESULT, result.build(run.plan, rep, numbers, self._attest_base(sup)).to_dict(include_output=False)

    def _attest_base(self, sup: _Sup) -> dict:
        """The launcher's part of a run's attestation: what it resolved and wrote."""
        run = sup.run
        assert run is not None
        return {"host_ns": self.host_ns, "uid_map": sup.maps[0], "gid_map": sup.maps[1],
                "id_mapping": self.idmode, "seccomp": run.seccomp_info, "landlock": run.landlock_info,
                "apparmor": run.apparmor_info, "apparmor_host_enabled": self.host["apparmor"]["enabled"],
                "cgroup": run.cgroup_readback, "network": run.network, "spare": run.spare}

    def shutdown(self) -> None:
        """Kill every run and spare, answer every waiting client, release everything."""
        for sup in list(self.sups.values()):
            linux.pidfd_send_signal(sup.pidfd, signal.SIGKILL)
        import select
        for sup in list(self.sups.values()):
            select.select([sup.pidfd], [], [], 5.0)      # gone (the zygote's child: no waitpid here)
            if sup.run is not None and sup.run.report is None:
                sup.run.report = {"launch_error": LaunchError("launcher shutting down", step="shutdown").to_dict()}
            self._on_exit(sup)
        # Let the worker finish every cgroup removal, then let it go.
        while self._worker_pending > 0:
            try:
                self._on_worker()
            except SandboxError:
                break
        self.worker.close()
        self.zygote.close()
        for pid in (self.worker_pid, self.zygote_pid):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        try:
            self.cgroups.close()           # the instance cgroups, now empty
        except SandboxError as e:
            if os.geteuid() == 0:          # a delegated (rootless) instance belongs to its delegator
                print(f"sandboxd-launcher: {e}", file=sys.stderr)


def check_plan_values(plan: Plan) -> None:
    """Plans arrive pickled from our own client, but a bad value must fail its run with a clear
    error, not the launcher's loop later: types and ranges of what the launcher computes with."""
    lim = plan.limits
    bad = []
    for name in ("wall_time_ms", "stdout_bytes", "stderr_bytes", "file_size_bytes", "stack_bytes",
                 "open_files", "cpu_extra_ms"):
        v = getattr(lim, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad.append(f"limits.{name}={v!r}")
    for name in ("cpu_time_ms", "memory_bytes", "pids", "address_space_bytes"):
        v = getattr(lim, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            bad.append(f"limits.{name}={v!r}")
    if not plan.argv or not all(isinstance(a, str) and a and "\0" not in a for a in plan.argv):
        bad.append("argv")
    if not all(isinstance(k, str) and isinstance(v, str) and "\0" not in k + v and "=" not in k
               for k, v in plan.env):
        bad.append("env")
    if bad:
        raise PlanError("invalid plan values: " + ", ".join(bad), step="plan")


def check_stdin(fd: int) -> None:
    """The workload's stdin must be data, never a handle on the host: a directory fd is an
    openat() root outside the sandbox, a socket a connection the plan did not grant. Regular
    files (memfds too), pipes and /dev/null only."""
    import stat
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise PlanError("stdin is not an open file", step="stdin", errno=e.errno) from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):   # /dev/null
        return
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
    raise PlanError(f"stdin is {kind}; only a regular file, a pipe or /dev/null may be given",
                    step="stdin")


def _lock_instance(config: RuntimeConfig) -> int:
    """One launcher per instance: a second one would take the first one's cgroups for a
    crashed predecessor's leftovers and kill its runs. Held (flock) for the process's life."""
    import fcntl
    d = os.path.dirname(os.path.abspath(config.root_mountpoint))
    path = os.path.join(d, f"instance-{config.instance}.lock")
    try:
        os.makedirs(d, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise HostCapabilityError("cannot open the instance lock", step="launcher", path=path,
                                  errno=e.errno) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise HostCapabilityError(f"another launcher of instance {config.instance!r} is running",
                                  step="launcher", path=path,
                                  hint="give each launcher its own RuntimeConfig.instance") from None
    return fd


def host_worker(sock: socket.socket, cgroups: Any, idmode: str, instance: str = "default",
                netcfg: Any = None) -> None:
    """A second single-threaded process, forked at start, for the slow privileged host steps.

    Creating a cgroup and moving a process into it (v1: an RCU grace period per hierarchy,
    tens of milliseconds on a loaded machine), writing id maps and removing cgroups would stall
    the launcher's loop and with it every other run's result. The worker does them one at a
    time and answers each request; the launcher goes on meanwhile. Requests and answers are
    pickled: both ends are this module."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, step="host_worker")
    net = None

    def network() -> Any:
        # Made on first use: pyroute2 takes a few hundred ms to import, which runs without
        # segments never pay.
        nonlocal net
        if net is None:
            from sandboxd.network.manager import NetworkManager
            net = NetworkManager(instance=instance, config=netcfg)
            net.cleanup_stale()
        return net

    while True:
        try:
            kind, payload, _ = protocol.recv(sock)
        except OSError:
            kind = b""
        if kind == b"":
            if net is not None:
                try:
                    net.close()
                except SandboxError as e:
                    print(f"sandboxd-worker: network close: {e}", file=sys.stderr)
            os._exit(0)
        req = pickle.loads(payload)
        rep: dict[str, Any] = {"sup": req.get("sup"), "uid": req.get("uid")}
        if kind == protocol.PREPARE:
            cg = None
            try:
                cg = cgroups.create(req["name"], SPARE_LIMITS)
                write_id_maps(req["init_pid"], req["uid_map"], req["gid_map"], idmode)
                cg.add_pid(req["init_pid"])            # before init runs any step of its own
                rep["cg"] = cg
            except SandboxError as e:
                rep["error"] = e.to_dict()
            except OSError as e:
                rep["error"] = LaunchError(str(e), step="prepare", errno=e.errno).to_dict()
            if "error" in rep and cg is not None:
                try:
                    cg.remove()
                except SandboxError:
                    pass
        elif kind == protocol.REMOVE:
            try:
                req["cg"].remove()
            except SandboxError as e:
                rep["error"] = str(e)
        elif kind == protocol.ATTACH:
            rep["run_id"] = req["run_id"]
            try:
                mgr = network()
                att = mgr.attach(req["run_id"], req["netns"], req["plan"], name=req["name"])
                if att.get("mode") == "segment":
                    att["hosts_file"] = mgr.hosts_file(req["plan"].segment)
                rep["attestation"] = att
            except SandboxError as e:
                rep["error"] = e.to_dict()
            except OSError as e:
                rep["error"] = LaunchError(str(e), step="network.attach", errno=e.errno).to_dict()
        elif kind == protocol.DETACH:
            try:
                if net is not None:
                    net.detach(req["run_id"])
            except SandboxError as e:
                rep["error"] = str(e)
        protocol.send(sock, kind, pickle.dumps(rep))


def write_id_maps(pid: int, uid_map: str, gid_map: str, idmode: str) -> None:
    """Init's uid/gid map: one inside id to one host id each."""
    if idmode == "newuidmap":
        import subprocess
        for tool, line in (("newuidmap", uid_map), ("newgidmap", gid_map)):
            r = subprocess.run([tool, str(pid), *line.split()], capture_output=True, text=True)
            if r.returncode != 0:
                raise LaunchError(f"{tool} failed: {r.stderr.strip()}", step="userns")
    else:
        linux.write_file(f"/proc/{pid}/setgroups", "deny", step="userns(setgroups)")
        linux.write_file(f"/proc/{pid}/uid_map", uid_map + "\n", step="userns(uid_map)")
        linux.write_file(f"/proc/{pid}/gid_map", gid_map + "\n", step="userns(gid_map)")


def _sha256_file(path: str) -> str:
    import hashlib
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise HostCapabilityError("cannot read seccomp profile", step="seccomp", path=path, errno=e.errno) from None


def _send_quiet(sock: socket.socket, kind: bytes, body: Any) -> None:
    try:
        protocol.send(sock, kind, body)
    except OSError:
        pass


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _reap(pid: int, pidfd: int) -> None:
    """Kill a supervisor and wait until it is gone (the zygote's child: the kernel reaps it;
    its pidfd turns readable when it has exited)."""
    import select
    linux.pidfd_send_signal(pidfd, signal.SIGKILL)
    select.select([pidfd], [], [], 5.0)
    os.close(pidfd)


def _pin_self() -> str:
    """Stay on one CPU of our set (the first). Returns "CPU:SET" for the staged stubs (the CPU
    to keep off while waiting, and the full set to take back), or "" when there is no other
    CPU to use.

    A woken process lands on its waker's CPU here (the scheduler takes an idle vCPU for a
    preempted one and never picks it), so a run's stub, woken by GO, would take this CPU while
    the launcher still has START to send and the other CPU idles: START went out ~1.5 ms late
    in most runs (measured). A staged stub waits with this CPU left out of its affinity and puts
    the full set back as soon as it wakes (sbx-exec.c), so it runs elsewhere. The full set goes
    with it because what it saw at staging is not it: a spare is staged in the cgroup tuned to
    its layout's first run, whose cpuset may differ from the run it serves."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return ""
    try:
        os.sched_setaffinity(0, {allowed[0]})
    except OSError:
        return ""
    return f"{allowed[0]}:{','.join(map(str, allowed))}"


def zygote_main(sock: socket.socket, stub_fd: int) -> None:
    """Forks supervisors on the launcher's request (SPAWN {"uid","gid"} -> SPAWNED {"pid"} +
    fds [the launcher's end of its socket, its pidfd]). A copy of the launcher made at start that
    does nothing else, so the pages the supervisors share copy-on-write are its, not those of
    the process doing each run's work."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, step="zygote")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps; the launcher has pidfds
    while True:
        try:
            kind, payload, _ = protocol.recv(sock)
        except OSError:
            kind = b""
        if kind != protocol.SPAWN:
            os._exit(0)
        req = protocol.loads(payload)
        lsock_l, lsock_p = protocol.seqpacket_pair()
        try:
            pid = os.fork()
        except OSError as e:
            lsock_l.close()
            lsock_p.close()
            _send_quiet(sock, protocol.ERROR, LaunchError("fork a supervisor", step="spare",
                                                          errno=e.errno).to_dict())
            continue
        if pid == 0:  # ---- supervisor
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # it waits for its init
                linux.close_fds_except((lsock_p.fileno(), stub_fd))
                sandbox.supervisor_main(lsock_p, req["uid"], req["gid"], stub_fd)
            finally:
                os._exit(123)
        lsock_p.close()
        try:
            pidfd = linux.pidfd_open(pid)
        except SandboxError as e:
            lsock_l.close()
            _send_quiet(sock, protocol.ERROR, e.to_dict())
            continue
        protocol.send(sock, protocol.SPAWNED, {"pid": pid}, fds=[lsock_l.fileno(), pidfd])
        lsock_l.close()
        os.close(pidfd)


def _close_stack(stack: contextlib.ExitStack) -> list[str]:
    """Close the run's stack; keep cleanup errors next to the result instead of losing them."""
    try:
        stack.close()
    except Exception as e:  # noqa: BLE001
        return [str(e)]
    return []


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="sandboxd-launcher")
    ap.add_argument("--ctl-fd", type=int, required=True)
    ap.add_argument("--config", default="{}")
    a = ap.parse_args(argv)
    ctl = socket.socket(fileno=a.ctl_fd)
    try:
        config = RuntimeConfig.from_dict(json.loads(a.config))
    except (ValueError, TypeError) as e:
        _send_quiet(ctl, protocol.ERROR, SandboxError(f"bad runtime config: {e}", step="launcher").to_dict())
        sys.exit(2)
    run_launcher(ctl, config)


def run_launcher(ctl: socket.socket, config: RuntimeConfig) -> None:
    """The launcher process's life: set up, answer GO (or ERROR), serve until the client goes."""
    linux.set_name(b"sbx-launcher")
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, step="launcher")
    linux.close_fds_except((ctl.fileno(),))
    try:
        launcher = Launcher(ctl, config)
    except SandboxError as e:
        _send_quiet(ctl, protocol.ERROR, e.to_dict())
        os._exit(2)
    launcher.serve()


if __name__ == "__main__":
    main()
