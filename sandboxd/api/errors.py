"""The one table from sandbox errors to gRPC status codes, and how an error goes on the wire.

Order matters: the first class an error is an instance of decides, so subclasses come first.
Every error status carries trailing metadata `sandboxd-error`: the error's JSON (kind, message,
step, path, errno, hint, and `field` for request errors), so clients can act on more than text.
Anything that is not a SandboxError is a bug: the client gets INTERNAL without details and the
server log gets the traceback.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import grpc

from sandboxd.api.auth import Unauthenticated
from sandboxd.engine.admission import Cancelled, ShuttingDown
from sandboxd.errors import (HostCapabilityError, LaunchError, PermissionDenied, PlanError,
                             PolicyError, ProfileError, ResourceExhausted, SandboxError)
from sandboxd.policy.request import RequestError

ERROR_METADATA_KEY = "sandboxd-error"

STATUS_TABLE: tuple[tuple[type[SandboxError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),        # no or unknown credentials
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),          # malformed request field
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),     # policy does not allow it
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),   # concurrency / queue full
    (Cancelled, grpc.StatusCode.CANCELLED),                    # caller left while queued
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),               # server stopping; retry elsewhere
    (HostCapabilityError, grpc.StatusCode.FAILED_PRECONDITION),  # host cannot enforce the plan
    (ProfileError, grpc.StatusCode.FAILED_PRECONDITION),       # profile changed/invalid on disk
    (PolicyError, grpc.StatusCode.FAILED_PRECONDITION),        # policies unusable
    (PlanError, grpc.StatusCode.INTERNAL),                     # engine produced a bad plan (bug)
    (LaunchError, grpc.StatusCode.INTERNAL),                   # a containment step failed
    (SandboxError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def code_name(exc: BaseException) -> str:
    return status_for(exc).name


def details(exc: SandboxError) -> dict[str, Any]:
    d = exc.to_dict()
    field = getattr(exc, "field", None)
    if field:
        d["field"] = field
    return d


def abort(context: grpc.ServicerContext, exc: SandboxError) -> NoReturn:
    """End the call with exc's status code, message and JSON details. Raises (grpc's way)."""
    context.set_trailing_metadata(((ERROR_METADATA_KEY, json.dumps(details(exc))),))
    context.abort(status_for(exc), str(exc))
    raise AssertionError("unreachable")   # context.abort raises
