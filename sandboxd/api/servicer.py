"""The Sandbox service: thin servicers over sandboxd.engine.service.Core.

Each method parses the raw request bytes itself (so a malformed message is INVALID_ARGUMENT, not
gRPC's generic INTERNAL), authenticates the caller, translates to domain values, calls the core,
and translates back. Sandbox errors become statuses through api/errors.py's single table.

Cancellation: every run gets a threading.Event that is set when the RPC terminates for any reason
(client cancel, deadline, server stop); the runtime kills the sandbox when it is set, and the
admission queue wakes up so a queued request leaves at once.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf.message import DecodeError

from sandboxd import __version__
from sandboxd.api import convert
from sandboxd.api.auth import Authenticator
from sandboxd.api.errors import abort
from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
from sandboxd.engine.service import Core, Identity
from sandboxd.errors import SandboxError
from sandboxd.policy.request import RequestError

SERVICE_NAME = "sandboxd.v1.Sandbox"
M = TypeVar("M")


def parse(cls: Callable[[], M], raw: bytes, what: str = "request") -> M:
    msg = cls()
    try:
        msg.ParseFromString(raw)   # type: ignore[attr-defined]
    except (DecodeError, ValueError, RuntimeError) as e:
        raise RequestError(what, f"not a valid {cls.__name__} message: {e}") from None
    return msg


def _raise(e: BaseException) -> Any:
    raise e


class SandboxServicer:
    def __init__(self, core: Core, auth: Authenticator) -> None:
        self.core = core
        self.auth = auth

    # -- plumbing -------------------------------------------------------------------------------
    def _guard(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SandboxError as e:
            err = e
        except Exception:   # a bug: full traceback to the log, no internals to the caller
            traceback.print_exc(file=sys.stderr)
            err = SandboxError("internal error (see the server log)", step="server")
        abort(context, err)

    def _cancel_event(self, context: grpc.ServicerContext) -> threading.Event:
        ev = threading.Event()

        def done() -> None:
            ev.set()
            self.core.admission.kick()
        if not context.add_callback(done):
            ev.set()   # the call already ended
        return ev

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float | None:
        left = context.time_remaining()
        return None if left is None else time.monotonic() + left

    def _who(self, context: grpc.ServicerContext) -> Identity:
        return self.auth.identify(context)

    # -- methods --------------------------------------------------------------------------------
    def Execute(self, raw: bytes, context: grpc.ServicerContext) -> pb.ExecuteResponse:
        def run() -> pb.ExecuteResponse:
            ident = self._who(context)
            req = convert.request_from_pb(parse(pb.ExecuteRequest, raw))
            outcome = self.core.execute(ident, req, self._cancel_event(context),
                                        deadline=self._deadline(context))
            return convert.execute_response(outcome)
        return self._guard(context, run)

    def ExecuteBatch(self, raw: bytes, context: grpc.ServicerContext) -> pb.ExecuteBatchResponse:
        def run() -> pb.ExecuteBatchResponse:
            ident = self._who(context)
            batch = convert.batch_from_pb(parse(pb.ExecuteBatchRequest, raw))
            decision, cases = self.core.execute_batch(ident, batch, self._cancel_event(context),
                                                      deadline=self._deadline(context))
            return pb.ExecuteBatchResponse(decision=convert.decision_to_pb(decision),
                                           cases=[convert.case_to_pb(c) for c in cases])
        return self._guard(context, run)

    def Explain(self, raw: bytes, context: grpc.ServicerContext) -> pb.ExplainResponse:
        def run() -> pb.ExplainResponse:
            ident = self._who(context)
            m = parse(pb.ExplainRequest, raw)
            d = self.core.explain(ident, convert.request_from_pb(m.request))
            return pb.ExplainResponse(decision=convert.decision_to_pb(d),
                                      plan_json=d.plan.to_json() if d.plan else "")
        return self._guard(context, run)

    def ValidatePolicy(self, raw: bytes, context: grpc.ServicerContext) -> pb.ValidatePolicyResponse:
        def run() -> pb.ValidatePolicyResponse:
            self._who(context)
            m = parse(pb.ValidatePolicyRequest, raw)
            names = [f.name or f"file{i}" for i, f in enumerate(m.files)]
            if len(set(names)) != len(names):
                raise RequestError("files", "file names must be unique")
            problems, policies = self.core.validate_policy(
                [(n, f.content) for n, f in zip(names, m.files)])
            return pb.ValidatePolicyResponse(
                ok=not problems, policies=policies,
                problems=[pb.PolicyProblem(file=p.file, line=p.line, column=p.column,
                                           key_path=p.key_path, reason=p.reason) for p in problems])
        return self._guard(context, run)

    def HostInfo(self, raw: bytes, context: grpc.ServicerContext) -> pb.HostInfoResponse:
        def run() -> pb.HostInfoResponse:
            self._who(context)
            parse(pb.HostInfoRequest, raw)
            return pb.HostInfoResponse(info=convert.struct(self.core.host_info()),
                                       server_version=__version__)
        return self._guard(context, run)

    def ExecuteStream(self, request_iterator: Iterator[bytes],
                      context: grpc.ServicerContext) -> Iterator[pb.ExecuteStreamResponse]:
        """First message `start`; then stdin chunks; responses stream out as produced."""
        events: "queue.Queue[tuple[str, Any]]" = queue.Queue()

        def setup() -> tuple[Identity, Any, threading.Event]:
            ident = self._who(context)
            try:
                first = next(request_iterator)
            except StopIteration:
                raise RequestError("start", "the stream ended before its first message") from None
            m = parse(pb.ExecuteStreamRequest, first)
            if m.WhichOneof("kind") != "start":
                raise RequestError("start", "the first message must be `start`")
            return ident, convert.request_from_pb(m.start), self._cancel_event(context)

        ident, req, cancel = self._guard(context, setup)
        if req.stdin:
            self._guard(context, lambda: _raise(
                RequestError("start.stdin", "must be empty in a stream: send stdin chunks")))
        max_stdin = self.core.state.config.requests.max_stdin_bytes
        r, w = os.pipe2(os.O_CLOEXEC)
        deadline = self._deadline(context)

        def pump_stdin() -> None:
            """Client stdin chunks -> the pipe the workload reads; EOF on close_stdin or end."""
            total = 0
            try:
                for raw in request_iterator:
                    m = pb.ExecuteStreamRequest()
                    try:
                        m.ParseFromString(raw)
                    except DecodeError:
                        events.put(("error", RequestError("stdin", "malformed stream message")))
                        cancel.set()
                        return
                    kind = m.WhichOneof("kind")
                    if kind == "stdin":
                        total += len(m.stdin)
                        if total > max_stdin:
                            events.put(("error", RequestError("stdin", f"more than {max_stdin} "
                                                                       "bytes streamed")))
                            cancel.set()
                            return
                        view = memoryview(m.stdin)
                        while view:
                            view = view[os.write(w, view):]
                    elif kind == "close_stdin":
                        return
                    else:
                        events.put(("error", RequestError("start", "`start` may be sent once")))
                        cancel.set()
                        return
            except Exception:   # the run ended (EPIPE), or the call did (cancelled, deadline)
                return
            finally:
                os.close(w)

        def run() -> None:
            try:
                outcome = self.core.execute(
                    ident, req, cancel, method="ExecuteStream", stdin=r, deadline=deadline,
                    on_output=lambda stream, chunk: events.put((stream, chunk)),
                    on_started=lambda run_id, d: events.put(("started", (run_id, d))))
                events.put(("result", outcome))
            except BaseException as e:   # handed to the response thread, which aborts with it
                events.put(("error", e))
            finally:
                os.close(r)

        threading.Thread(target=pump_stdin, name="stream-stdin", daemon=True).start()
        threading.Thread(target=run, name="stream-run", daemon=True).start()
        while True:
            kind, val = events.get()
            if kind == "started":
                yield pb.ExecuteStreamResponse(started=pb.Started(
                    run_id=val[0], decision=convert.decision_to_pb(val[1])))
            elif kind == "stdout":
                yield pb.ExecuteStreamResponse(stdout=val)
            elif kind == "stderr":
                yield pb.ExecuteStreamResponse(stderr=val)
            elif kind == "result":
                yield pb.ExecuteStreamResponse(result=convert.execute_response(val, with_output=False))
                return
            elif kind == "error":
                cancel.set()
                self._guard(context, lambda e=val: _raise(e))
                return
