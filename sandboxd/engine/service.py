"""The daemon's core: request -> validated -> decided -> admitted -> run -> audited.

Everything the gRPC servicers do goes through `Core`; servicers only translate messages. The
order of a run is fixed and on one screen in `_run_one`: validate (RequestError), decide
(PermissionDenied), admit (ResourceExhausted / Cancelled), prepare the work directory (registered
for removal the moment it exists), run, read outputs back, remove, audit, count. A sandbox failure
is raised (and audited as an error); a workload failure is a Result (and audited as a run).

Policies and config are one immutable `State` swapped atomically by `reload()`: a request uses the
state it started with, and a bad reload keeps the old state and says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from sandboxd.engine.admission import Admission
from sandboxd.engine.audit import AuditLog
from sandboxd.engine.config import Loaded, ServerConfig, load_all, load_context
from sandboxd.engine.metrics import Metrics
from sandboxd.engine.recovery import StateLock, recover, recover_runtime
from sandboxd.engine.workdir import OutputFileResult, WorkDirs, link_files, read_output, write_files
from sandboxd.errors import PermissionDenied, PolicyError, SandboxError
from sandboxd.plan import Plan, Result, Status
from sandboxd.policy.engine import Decision, decide, explain, resolve_limits
from sandboxd.policy.loader import PolicySet, load_policy_texts
from sandboxd.policy.request import (BatchRequest, RequestError, RunRequest, validate_batch,
                                     validate_request)
from sandboxd.policy.source import Problem


@dataclass(frozen=True)
class Identity:
    """Who is calling: the tenant, how we know, and a description of the peer for the audit log."""

    tenant: str
    method: str        # "unix_peer", "token", "tls"
    peer: str = ""


@dataclass(frozen=True)
class State:
    config: ServerConfig
    policies: PolicySet


@dataclass
class RunOutcome:
    run_id: str
    decision: Decision
    result: Result
    files: list[OutputFileResult] = field(default_factory=list)


@dataclass
class CaseOutcome:
    name: str
    run_id: str = ""
    result: Result | None = None
    files: list[OutputFileResult] = field(default_factory=list)
    skipped: bool = False


OutputCallback = Callable[[str, bytes], None]


def new_run_id() -> str:
    return uuid.uuid4().hex


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Core:
    def __init__(self, loaded: Loaded, runtime: Any, *, audit: AuditLog | None = None,
                 metrics: Metrics | None = None, log: Callable[[str], None] | None = None) -> None:
        self.config_path = loaded.config_path
        self._state = State(loaded.config, loaded.policies)
        cfg = loaded.config
        # A runtime, or a factory for one: the daemon starts its runtime only once it holds the
        # state directory's lock, so a second daemon never starts a launcher that would clean up
        # (kill) the first one's runs.
        self._runtime_factory = runtime if callable(runtime) and not hasattr(runtime, "run") else None
        self.runtime = None if self._runtime_factory else runtime
        self.admission = Admission(cfg.concurrency.max_running, cfg.concurrency.max_queued)
        self.audit = audit if audit is not None else AuditLog(cfg.audit_log)
        snap = self.admission.snapshot
        self.metrics = metrics or Metrics(running=lambda: snap().running, queued=lambda: snap().queued)
        self.workdirs = WorkDirs(os.path.join(cfg.state_dir, "work"), cfg.work_dir_tmpfs)
        self.log = log or (lambda s: print(f"sandboxd: {s}", file=sys.stderr, flush=True))
        self._lock: StateLock | None = None
        self._active: set[threading.Event] = set()
        self._active_lock = threading.Lock()
        self._reload_lock = threading.Lock()

    @property
    def state(self) -> State:
        return self._state

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Lock the state directory, remove leftovers of a previous instance, prepare work dirs."""
        cfg = self._state.config
        self._lock = StateLock(cfg.state_dir)
        actions = recover(cfg.state_dir)
        # Before the runtime starts: its spare sandboxes copy our mount namespace ahead of time
        # and must see the work root as it will be (WorkDirs.prepare says why).
        self.workdirs.prepare()
        if self._runtime_factory is not None:
            self.runtime = self._runtime_factory()
        actions += recover_runtime(self.runtime)
        for a in actions:
            self.log(f"recovery: {a}")
        self.audit.write("start", pid=os.getpid(), policies=sorted(self._state.policies.policies),
                         policy_set=self._state.policies.digest, recovered=actions)
        return actions

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let runs finish for grace_s, cancel the rest, release everything."""
        self.admission.close()
        if self._lock is None:
            # start() never got the state directory: it belongs to someone else, touch nothing.
            if self.runtime is not None:
                with contextlib.suppress(Exception):
                    self.runtime.close()
            return
        if not self.admission.wait_idle(grace_s):
            with self._active_lock:
                active = list(self._active)
            self.log(f"shutdown: cancelling {len(active)} run(s) still going after {grace_s:g}s")
            for ev in active:
                ev.set()
            self.admission.wait_idle(30.0)
        with contextlib.suppress(Exception):
            self.runtime.close()
        try:
            self.workdirs.release()
            os.rmdir(self.workdirs.root)   # empty by now; if not, leave it to the next start
        except (SandboxError, OSError) as e:
            self.log(f"shutdown: {e}")
        self.audit.write("stop", pid=os.getpid())
        self.audit.close()
        if self._lock is not None:
            self._lock.release()

    def reload(self) -> tuple[bool, list[Problem]]:
        """Re-read config and policies; swap atomically, or keep the old ones and log why."""
        with self._reload_lock:
            try:
                loaded = load_all(self.config_path)
            except PolicyError as e:
                problems = list(e.errors) or [Problem(self.config_path or "", 0, 0, "", str(e))]
                self.log(f"reload failed, keeping the previous policies ({len(problems)} problem(s)):")
                for p in problems:
                    self.log(f"  {p}")
                self.audit.write("reload", ok=False, problems=[str(p) for p in problems])
                self.metrics.reloads.inc("error")
                return False, problems
            old = self._state.config
            for key in ("listen", "state_dir", "work_dir_tmpfs", "audit_log", "metrics", "runtime"):
                if getattr(old, key) != getattr(loaded.config, key):
                    self.log(f"reload: '{key}' changed; it takes effect on restart")
            new_cfg = dataclasses.replace(loaded.config, **{k: getattr(old, k) for k in (
                "listen", "state_dir", "work_dir_tmpfs", "audit_log", "metrics", "runtime")})
            self.admission.resize(new_cfg.concurrency.max_running, new_cfg.concurrency.max_queued)
            self._state = State(new_cfg, loaded.policies)   # the atomic swap
            self.log(f"reloaded: policies {', '.join(sorted(loaded.policies.policies))}")
            self.audit.write("reload", ok=True, policies=sorted(loaded.policies.policies),
                             policy_set=loaded.policies.digest)
            self.metrics.reloads.inc("ok")
            return True, []

    # -- queries --------------------------------------------------------------------------------
    def _default_policy(self, st: State, tenant: str) -> str | None:
        t = st.config.tenants.get(tenant)
        return t.default_policy if t else None

    def explain(self, ident: Identity, req: RunRequest) -> Decision:
        st = self._state
        validate_request(req, st.config.requests)
        d = explain(st.policies, ident.tenant, req, self._default_policy(st, ident.tenant))
        self.audit.write("explain", tenant=ident.tenant, auth=ident.method, peer=ident.peer,
                         policy=d.policy, allowed=d.allowed, denied_field=d.denied_field,
                         argv=list(req.argv))
        return d

    def validate_policy(self, files: list[tuple[str, str]]) -> tuple[list[Problem], list[str]]:
        st = self._state
        if not files:
            return [Problem("", 0, 0, "", "no policy files given")], []
        try:
            ps = load_policy_texts(files, load_context(st.config))
        except PolicyError as e:
            return list(e.errors), []
        return [], sorted(ps.policies)

    def host_info(self) -> dict[str, Any]:
        return dict(self.runtime.host_info())

    # -- runs -----------------------------------------------------------------------------------
    def execute(self, ident: Identity, req: RunRequest, cancel: threading.Event, *,
                method: str = "Execute", stdin: Any = None, on_output: OutputCallback | None = None,
                on_started: Callable[[str, Decision], None] | None = None,
                deadline: float | None = None) -> RunOutcome:
        t0 = time.monotonic()
        st = self._state
        try:
            validate_request(req, st.config.requests, allow_stdin=stdin is None)
            decision = decide(st.policies, ident.tenant, req, self._default_policy(st, ident.tenant))
        except (RequestError, PermissionDenied) as e:
            self._rejected(ident, method, req, e)
            raise
        run_id = new_run_id()
        outcome = self._admitted(st, ident, method, decision, run_id, cancel, deadline,
                                 lambda: self._run_one(st, ident, method, req, decision, run_id,
                                                       cancel, stdin, on_output, on_started, t0))
        return outcome

    def _admitted(self, st: State, ident: Identity, method: str, decision: Decision, run_id: str,
                  cancel: threading.Event, deadline: float | None, body: Callable[[], Any]) -> Any:
        cc = decision.compiled.spec.concurrency if decision.compiled else None
        try:
            slot = self.admission.acquire(ident.tenant, cc.max_running if cc else 1,
                                          cc.max_queued if cc else 0, cancel, deadline)
        except SandboxError as e:
            self._rejected(ident, method, None, e, policy=decision.policy)
            raise
        with self._active_lock:
            self._active.add(cancel)
        try:
            with slot:
                return body()
        except SandboxError as e:
            self.metrics.errors.inc(ident.tenant, type(e).__name__)
            self.audit.write("error", run_id=run_id, tenant=ident.tenant, method=method,
                             policy=decision.policy, error=e.to_dict())
            raise
        finally:
            with self._active_lock:
                self._active.discard(cancel)

    def _run_one(self, st: State, ident: Identity, method: str, req: RunRequest, decision: Decision,
                 run_id: str, cancel: threading.Event, stdin: Any, on_output: OutputCallback | None,
                 on_started: Callable[[str, Decision], None] | None, t0: float) -> RunOutcome:
        assert decision.plan is not None
        plan = decision.plan
        files: list[OutputFileResult] = []
        with contextlib.ExitStack() as stack:
            box = None
            if req.files or req.output_files:
                wd = self.workdirs.create(run_id, plan.filesystem.work_size_bytes)
                stack.callback(wd.close)
                box = wd.subdir("box")
                write_files(box, req.files)
            plan = dataclasses.replace(plan, run_id=run_id, filesystem=dataclasses.replace(
                plan.filesystem, work_host_path=box))
            if on_started is not None:
                on_started(run_id, decision)
            result = self.runtime.run(plan, stdin=stdin if stdin is not None else (req.stdin or None),
                                      on_output=on_output, cancel=cancel)
            if box is not None:
                limit = st.config.requests.max_output_file_bytes
                files = [read_output(box, n, limit) for n in req.output_files]
        self._ran(st, ident, method, req, decision, plan, result, run_id, t0)
        return RunOutcome(run_id, decision, result, files)

    def execute_batch(self, ident: Identity, batch: BatchRequest,
                      cancel: threading.Event, deadline: float | None = None
                      ) -> tuple[Decision, list[CaseOutcome]]:
        t0 = time.monotonic()
        st = self._state
        prog = batch.program
        try:
            validate_batch(batch, st.config.requests)
            decision = decide(st.policies, ident.tenant, prog, self._default_policy(st, ident.tenant))
            assert decision.compiled is not None and decision.plan is not None
            # Every case's limits are decided before anything runs: a batch is refused whole.
            case_limits = [resolve_limits(decision.compiled, {**prog.limits, **c.limits}, [],
                                          prefix=f"cases[{i}].")
                           for i, c in enumerate(batch.cases)]
        except (RequestError, PermissionDenied) as e:
            self._rejected(ident, "ExecuteBatch", prog, e)
            raise
        batch_id = new_run_id()

        def body() -> list[CaseOutcome]:
            assert decision.plan is not None
            out: list[CaseOutcome] = []
            with contextlib.ExitStack() as stack:
                wd = self.workdirs.create(batch_id, decision.plan.filesystem.work_size_bytes)
                stack.callback(wd.close)
                # Written once; hard links give each case the same inodes, read-only to it.
                shared = wd.subdir("shared")
                write_files(shared, prog.files, mode_mask=0o755)
                shared_names = [f.name for f in prog.files]
                failed = False
                for i, case in enumerate(batch.cases):
                    if (failed and batch.stop_on_failure) or cancel.is_set():
                        out.append(CaseOutcome(case.name, skipped=True))
                        continue
                    run_id = f"{batch_id}-{i}"
                    name = f"case-{i}"
                    box = wd.subdir(name)
                    try:
                        link_files(shared, box, shared_names)
                        write_files(box, case.files)
                        plan = dataclasses.replace(
                            decision.plan, run_id=run_id, limits=case_limits[i],
                            filesystem=dataclasses.replace(decision.plan.filesystem,
                                                           work_host_path=box))
                        t1 = time.monotonic()
                        result = self.runtime.run(plan, stdin=case.stdin or None, cancel=cancel)
                        limit = st.config.requests.max_output_file_bytes
                        files = [read_output(box, n, limit) for n in prog.output_files]
                    finally:
                        wd.remove_subdir(name)
                    self._ran(st, ident, "ExecuteBatch", prog, decision, plan, result, run_id, t1,
                              extra={"batch_id": batch_id, "case": i, "case_name": case.name,
                                     "stdin_sha256": _sha256(case.stdin)})
                    out.append(CaseOutcome(case.name, run_id, result, files))
                    failed = failed or result.status != Status.OK
            return out

        outcomes = self._admitted(st, ident, "ExecuteBatch", decision, batch_id, cancel, deadline, body)
        self.metrics.latency.observe(time.monotonic() - t0, "ExecuteBatch")
        return decision, outcomes

    # -- audit and metrics ----------------------------------------------------------------------
    def _rejected(self, ident: Identity, method: str, req: RunRequest | None, e: SandboxError,
                  policy: str = "") -> None:
        kind = type(e).__name__   # the API maps kinds to gRPC codes (sandboxd/api/errors.py)
        self.metrics.rejections.inc(ident.tenant, kind)
        rec: dict[str, Any] = {"tenant": ident.tenant, "auth": ident.method, "peer": ident.peer,
                               "method": method, "kind": kind, "error": e.to_dict()}
        if policy:
            rec["policy"] = policy
        if req is not None:
            rec["argv"] = list(req.argv[:64])
        self.audit.write("rejected", **rec)

    def _ran(self, st: State, ident: Identity, method: str, req: RunRequest, decision: Decision,
             plan: Plan, result: Result, run_id: str, t0: float,
             extra: dict[str, Any] | None = None) -> None:
        elapsed = time.monotonic() - t0
        status = result.status.value if isinstance(result.status, Status) else str(result.status)
        m = self.metrics
        m.runs.inc(ident.tenant, status)
        if result.killed_by_sandbox:
            m.kills.inc(ident.tenant, result.kill_reason or status)
        if result.oom_kills:
            m.oom_kills.inc(ident.tenant, by=result.oom_kills)
        if method != "ExecuteBatch":
            m.latency.observe(elapsed, method)
        m.run_time.observe(result.wall_time_ms / 1000.0)
        rec: dict[str, Any] = {
            "run_id": run_id, "tenant": ident.tenant, "auth": ident.method, "peer": ident.peer,
            "method": method, "policy": decision.policy, "policy_set": st.policies.digest,
            "argv": list(plan.argv), "cwd": plan.cwd, "env_names": [k for k, _ in req.env],
            "files": [{"name": f.name, "bytes": len(f.content), "sha256": _sha256(f.content)}
                      for f in req.files],
            "stdin_sha256": _sha256(req.stdin) if req.stdin else None,
            "plan_sha256": _sha256(plan.to_json().encode()),
            "seccomp": {"name": plan.seccomp.name, "sha256": plan.seccomp.sha256} if plan.seccomp else None,
            "limits": dataclasses.asdict(plan.limits), "network": plan.network.mode,
            "labels": dict(req.labels),
            "outcome": {"status": status, "exit_code": result.exit_code, "signal": result.signal,
                        "cpu_time_ms": result.cpu_time_ms, "wall_time_ms": result.wall_time_ms,
                        "peak_memory_bytes": result.peak_memory_bytes,
                        "killed_by_sandbox": result.killed_by_sandbox,
                        "kill_reason": result.kill_reason,
                        "denied_syscalls": [d.name for d in result.denied_syscalls]},
            "duration_ms": round(elapsed * 1000, 3),
        }
        if extra:
            rec.update(extra)
        self.audit.write("run", **rec)
