"""Wire messages <-> domain values. No decisions here: only translation."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from google.protobuf import struct_pb2

from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
from sandboxd.engine.service import CaseOutcome, RunOutcome
from sandboxd.engine.workdir import OutputFileResult
from sandboxd.plan import Result, Status
from sandboxd.policy.engine import Decision
from sandboxd.policy.request import BatchCase, BatchRequest, BindAsk, InputFile, RunRequest
from sandboxd.policy.schema import REQUESTABLE_LIMITS

_STATUS_TO_PB = {s: getattr(pb, f"STATUS_{s.value}") for s in Status}
_PB_TO_STATUS = {v: k for k, v in _STATUS_TO_PB.items()}


def limits_from_pb(m: pb.Limits) -> dict[str, int | float]:
    return {name: getattr(m, name) for name in REQUESTABLE_LIMITS if m.HasField(name)}


def files_from_pb(files: Iterable[pb.InputFile]) -> tuple[InputFile, ...]:
    return tuple(InputFile(name=f.name, content=bytes(f.content), mode=f.mode or 0o644) for f in files)


def request_from_pb(m: pb.ExecuteRequest) -> RunRequest:
    return RunRequest(
        argv=tuple(m.argv),
        env=tuple((e.name, e.value) for e in m.env),
        cwd=m.cwd,
        files=files_from_pb(m.files),
        stdin=bytes(m.stdin),
        policy=m.policy,
        seccomp_profile=m.seccomp_profile,
        limits=limits_from_pb(m.limits),
        network=m.network,
        output_files=tuple(m.output_files),
        labels=tuple(sorted(m.labels.items())),
        binds=tuple(BindAsk(b.source, b.target, b.writable) for b in m.binds),
    )


def batch_from_pb(m: pb.ExecuteBatchRequest) -> BatchRequest:
    return BatchRequest(
        program=request_from_pb(m.program),
        cases=tuple(BatchCase(name=c.name, stdin=bytes(c.stdin), limits=limits_from_pb(c.limits),
                              files=files_from_pb(c.files)) for c in m.cases),
        stop_on_failure=m.stop_on_failure,
    )


def request_to_pb(r: RunRequest) -> pb.ExecuteRequest:
    """The reverse, for clients and tests."""
    m = pb.ExecuteRequest(argv=list(r.argv), cwd=r.cwd, stdin=r.stdin, policy=r.policy,
                          seccomp_profile=r.seccomp_profile, network=r.network,
                          output_files=list(r.output_files))
    m.env.extend(pb.EnvVar(name=k, value=v) for k, v in r.env)
    m.files.extend(pb.InputFile(name=f.name, content=f.content, mode=f.mode) for f in r.files)
    for k, v in r.limits.items():
        setattr(m.limits, k, v)
    m.labels.update(dict(r.labels))
    m.binds.extend(pb.BindRequest(source=b.source, target=b.target, writable=b.writable) for b in r.binds)
    return m


def jsonable(d: Any) -> Any:
    """A dict safe for google.protobuf.Struct (no bytes, tuples, non-finite floats)."""
    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            return o.decode("utf-8", "backslashreplace")
        if hasattr(o, "value"):
            return o.value
        return str(o)

    def fix(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {str(k): fix(v) for k, v in o.items()}
        if isinstance(o, list):
            return [fix(x) for x in o]
        return o
    return fix(json.loads(json.dumps(d, default=default)))


def struct(d: dict[str, Any] | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if d:
        s.update(jsonable(d))
    return s


def decision_to_pb(d: Decision) -> pb.Decision:
    return pb.Decision(allowed=d.allowed, tenant=d.tenant, policy=d.policy, notes=list(d.notes),
                       denied_field=d.denied_field, reason=d.reason)


def output_file_to_pb(f: OutputFileResult) -> pb.OutputFile:
    return pb.OutputFile(name=f.name, content=f.content, size_bytes=f.size_bytes,
                         truncated=f.truncated, error=f.error)


def result_to_pb(r: Result, files: Iterable[OutputFileResult] = (), with_output: bool = True) -> pb.RunResult:
    status = r.status if isinstance(r.status, Status) else Status(r.status)
    m = pb.RunResult(
        status=_STATUS_TO_PB[status],
        signal_name=r.signal_name or "",
        cpu_time_ms=float(r.cpu_time_ms), wall_time_ms=float(r.wall_time_ms),
        peak_memory_bytes=int(r.peak_memory_bytes), oom_kills=int(r.oom_kills),
        killed_by_sandbox=bool(r.killed_by_sandbox), kill_reason=r.kill_reason or "",
        stdout_truncated=bool(r.stdout_truncated), stderr_truncated=bool(r.stderr_truncated),
    )
    if r.exit_code is not None:
        m.exit_code = r.exit_code
    if r.signal is not None:
        m.signal = r.signal
    if with_output:
        m.stdout = bytes(r.stdout)
        m.stderr = bytes(r.stderr)
    m.denied_syscalls.extend(pb.DeniedSyscall(name=d.name, count=d.count, action=d.action)
                             for d in r.denied_syscalls)
    m.files.extend(output_file_to_pb(f) for f in files)
    m.attestation.CopyFrom(struct(r.attestation))
    return m


def execute_response(o: RunOutcome, with_output: bool = True) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(run_id=o.run_id, result=result_to_pb(o.result, o.files, with_output),
                              decision=decision_to_pb(o.decision))


def case_to_pb(c: CaseOutcome) -> pb.CaseResult:
    m = pb.CaseResult(name=c.name, run_id=c.run_id, skipped=c.skipped)
    if c.result is not None:
        m.result.CopyFrom(result_to_pb(c.result, c.files))
    return m


def status_name(code: int) -> str:
    """pb.STATUS_OK -> "OK"."""
    s = _PB_TO_STATUS.get(code)
    return s.value if s else "UNSPECIFIED"
