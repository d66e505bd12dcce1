"""Python client for the sandboxd daemon.

    from sandboxd.client import Client
    with Client() as c:                                  # default unix socket
        r = c.execute(["/bin/echo", "hi"])
        print(r.result.status, r.result.stdout)

    Client(target="sandboxd.example:7443", tls=TLS(ca="ca.pem", cert="me.pem", key="me.key"))
    Client(socket="/run/sandboxd/sandboxd.sock", token="...")   # bearer token

Methods return the response messages of proto/sandboxd/v1/sandboxd.proto. Errors raise
`ClientError` with the gRPC code, the message, and the server's JSON details (`.details`:
kind, step, field, hint, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grpc

from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2_grpc as pb_grpc
from sandboxd.engine.defaults import DEFAULT_SOCKET  # noqa: F401 (also sandboxd.client.DEFAULT_SOCKET)

ERROR_METADATA_KEY = "sandboxd-error"
_MAX_MESSAGE = 1 << 30   # results carry stdout/stderr and files; the server bounds them

File = tuple[str, bytes] | tuple[str, bytes, int] | pb.InputFile


@dataclass(frozen=True)
class TLS:
    ca: str                       # CA bundle the server certificate must chain to
    cert: str | None = None       # client certificate (mutual TLS)
    key: str | None = None
    server_name: str | None = None   # override the name checked in the server certificate


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, details: dict[str, Any]) -> None:
        self.code = code
        self.message = message
        self.details = details
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "ClientError":
        details: dict[str, Any] = {}
        for k, v in (e.trailing_metadata() or ()):   # type: ignore[attr-defined]
            if k == ERROR_METADATA_KEY:
                try:
                    details = json.loads(v)
                except ValueError:
                    pass
        return cls(e.code(), e.details() or "", details)   # type: ignore[attr-defined]


def _read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def make_request(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "",
                 files: Iterable[File] = (), stdin: bytes = b"", policy: str = "",
                 seccomp_profile: str = "", limits: Mapping[str, int | float] | None = None,
                 network: str = "", output_files: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None,
                 binds: Iterable[tuple[str, str, bool]] = ()) -> pb.ExecuteRequest:
    m = pb.ExecuteRequest(argv=list(argv), cwd=cwd, stdin=stdin, policy=policy,
                          seccomp_profile=seccomp_profile, network=network,
                          output_files=list(output_files))
    m.env.extend(pb.EnvVar(name=k, value=v) for k, v in (env or {}).items())
    for f in files:
        if isinstance(f, pb.InputFile):
            m.files.append(f)
        else:
            m.files.append(pb.InputFile(name=f[0], content=f[1], mode=f[2] if len(f) > 2 else 0))
    for k, v in (limits or {}).items():
        setattr(m.limits, k, v)
    m.labels.update(labels or {})
    m.binds.extend(pb.BindRequest(source=s, target=t, writable=w) for s, t, w in binds)
    return m


def to_result(m: pb.RunResult) -> Any:
    """A RunResult message -> sandboxd.plan.Result (files are left on the message)."""
    from google.protobuf.json_format import MessageToDict

    from sandboxd.plan import DeniedSyscall, Result, Status
    name = pb.Status.Name(m.status).removeprefix("STATUS_")
    return Result(
        status=Status(name) if name in Status.__members__ else Status.RUNTIME_ERROR,
        exit_code=m.exit_code if m.HasField("exit_code") else None,
        signal=m.signal if m.HasField("signal") else None,
        cpu_time_ms=m.cpu_time_ms, wall_time_ms=m.wall_time_ms,
        peak_memory_bytes=m.peak_memory_bytes, oom_kills=m.oom_kills,
        killed_by_sandbox=m.killed_by_sandbox, kill_reason=m.kill_reason or None,
        denied_syscalls=[DeniedSyscall(d.name, d.count, d.action) for d in m.denied_syscalls],
        stdout=m.stdout, stderr=m.stderr, stdout_truncated=m.stdout_truncated,
        stderr_truncated=m.stderr_truncated, attestation=MessageToDict(m.attestation))


class Client:
    def __init__(self, target: str | None = None, *, socket: str | None = None,
                 tls: TLS | None = None, token: str | None = None,
                 timeout: float | None = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        opts = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE), *options]
        if tls is not None:
            if target is None:
                raise ValueError("TLS needs a host:port target")
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca),
                private_key=_read(tls.key) if tls.key else None,
                certificate_chain=_read(tls.cert) if tls.cert else None)
            if tls.server_name:
                opts.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            if target is not None and not target.startswith("unix:"):
                raise ValueError("plain-text connections are only for the unix socket; use tls=")
            path = socket or (target[len("unix:"):] if target else DEFAULT_SOCKET)
            self.channel = grpc.insecure_channel(f"unix:{path}", options=opts)
        self.stub = pb_grpc.SandboxStub(self.channel)
        self.timeout = timeout
        self._md = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, fn: Callable[..., Any], req: Any, timeout: float | None) -> Any:
        try:
            return fn(req, timeout=timeout if timeout is not None else self.timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    # -- RPCs -----------------------------------------------------------------------------------
    def execute(self, argv: Sequence[str] | pb.ExecuteRequest, *, timeout: float | None = None,
                **kw: Any) -> pb.ExecuteResponse:
        req = argv if isinstance(argv, pb.ExecuteRequest) else make_request(argv, **kw)
        return self._call(self.stub.Execute, req, timeout)

    def execute_future(self, req: pb.ExecuteRequest, *, timeout: float | None = None) -> grpc.Future:
        """Start an Execute and return its future (`.cancel()` kills the run)."""
        return self.stub.Execute.future(req, timeout=timeout if timeout is not None else self.timeout,
                                        metadata=self._md)

    def explain(self, argv: Sequence[str] | pb.ExecuteRequest, *, timeout: float | None = None,
                **kw: Any) -> pb.ExplainResponse:
        req = argv if isinstance(argv, pb.ExecuteRequest) else make_request(argv, **kw)
        return self._call(self.stub.Explain, pb.ExplainRequest(request=req), timeout)

    def execute_batch(self, program: pb.ExecuteRequest, cases: Iterable[pb.BatchCase], *,
                      stop_on_failure: bool = False,
                      timeout: float | None = None) -> pb.ExecuteBatchResponse:
        return self._call(self.stub.ExecuteBatch,
                          pb.ExecuteBatchRequest(program=program, cases=list(cases),
                                                 stop_on_failure=stop_on_failure), timeout)

    def execute_stream(self, start: pb.ExecuteRequest, stdin: Iterable[bytes] = (), *,
                       timeout: float | None = None) -> Iterator[pb.ExecuteStreamResponse]:
        """Stream stdin chunks in; yields started, stdout/stderr chunks, then the result."""
        def requests() -> Iterator[pb.ExecuteStreamRequest]:
            yield pb.ExecuteStreamRequest(start=start)
            for chunk in stdin:
                yield pb.ExecuteStreamRequest(stdin=chunk)
            yield pb.ExecuteStreamRequest(close_stdin=pb.CloseStdin())
        try:
            for m in self.stub.ExecuteStream(requests(), timeout=timeout if timeout is not None
                                             else self.timeout, metadata=self._md):
                yield m
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    def validate_policy(self, files: Mapping[str, str], *,
                        timeout: float | None = None) -> pb.ValidatePolicyResponse:
        req = pb.ValidatePolicyRequest(files=[pb.PolicyFile(name=n, content=c) for n, c in files.items()])
        return self._call(self.stub.ValidatePolicy, req, timeout)

    def host_info(self, *, timeout: float | None = None) -> pb.HostInfoResponse:
        return self._call(self.stub.HostInfo, pb.HostInfoRequest(), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
