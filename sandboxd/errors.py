"""Errors of the sandbox itself (never of the workload: that is a value in the Result).

Every error names the step, the object and the cause, and says how to fix it when we know.
The API layer maps these classes to gRPC status codes in one table (sandboxd/api/errors.py).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any


class SandboxError(Exception):
    """Base class: the sandbox could not do what was asked."""

    def __init__(self, message: str, *, step: str | None = None, path: str | None = None,
                 errno: int | None = None, hint: str | None = None) -> None:
        self.step = step
        self.path = path
        self.errno = errno
        self.hint = hint
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.step:
            parts.append(f"{self.step}:")
        parts.append(self.message)
        if self.path:
            parts.append(f"[{self.path}]")
        if self.errno is not None:
            parts.append(f"({_errno.errorcode.get(self.errno, self.errno)}: {os.strerror(self.errno)})")
        s = " ".join(parts)
        if self.hint:
            s += f"; hint: {self.hint}"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "message": self.message, "step": self.step,
                "path": self.path, "errno": self.errno, "hint": self.hint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SandboxError":
        kind = _KINDS.get(d.get("kind", ""), SandboxError)
        return kind(d.get("message", "unknown error"), step=d.get("step"), path=d.get("path"),
                    errno=d.get("errno"), hint=d.get("hint"))


class LaunchError(SandboxError):
    """A containment step failed while building the sandbox (mount, unshare, capset, ...)."""


class HostCapabilityError(SandboxError):
    """The plan requires a control this host cannot apply; the run is refused, never downgraded."""


class ProfileError(SandboxError):
    """A seccomp/AppArmor profile is malformed, unknown, or names something unknown."""


class PlanError(SandboxError):
    """The plan itself is inconsistent (a bug in the engine or a hand-written plan)."""


class PolicyError(SandboxError):
    """Policy files are invalid; `errors` holds every problem found, each with file:line and key path."""

    def __init__(self, message: str, errors: list[Any] | None = None, **kw: Any) -> None:
        self.errors = list(errors or [])
        super().__init__(message, **kw)


class PermissionDenied(SandboxError):
    """The policy does not allow what the request asked for (names the field and the bound)."""


class ResourceExhausted(SandboxError):
    """Concurrency or queue limits reached."""


_KINDS = {c.__name__: c for c in (SandboxError, LaunchError, HostCapabilityError, ProfileError,
                                  PlanError, PolicyError, PermissionDenied, ResourceExhausted)}
