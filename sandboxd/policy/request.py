"""What a caller asked for, as a plain value, and the structural checks every request passes first.

The API layer translates the wire message into a RunRequest; `validate_request` then checks every
field against the server's hard bounds (counts, sizes, names) before the policy engine looks at it.
A failure here is a RequestError (INVALID_ARGUMENT, naming the field); what the *policy* refuses is
a PermissionDenied from the engine. File names are checked here so that nothing downstream ever
sees '..', an absolute path, NUL or a control character.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from sandboxd.errors import SandboxError
from sandboxd.policy.schema import ENV_NAME_PATTERN, NAME_PATTERN, REQUESTABLE_LIMITS
from sandboxd.policy.validate import spec

_NAME_RE = re.compile(NAME_PATTERN)
_ENV_RE = re.compile(ENV_NAME_PATTERN)
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_SAFE_INT = 1 << 53   # above this a JSON reader may lose precision; no limit is that large


class RequestError(SandboxError):
    """The request is malformed: a field is out of its bounds or unsafe (INVALID_ARGUMENT).

    `field` names the request field at fault ("files[3].name", "limits.memory_bytes").
    """

    def __init__(self, field: str, message: str, **kw: Any) -> None:
        self.field = field
        kw.setdefault("step", "validate_request")
        super().__init__(f"{field}: {message}", **kw)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["field"] = self.field
        return d


@dataclass(frozen=True)
class InputFile:
    name: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class BindAsk:
    source: str
    target: str
    writable: bool = False


@dataclass(frozen=True)
class RunRequest:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    files: tuple[InputFile, ...] = ()
    stdin: bytes = b""
    policy: str = ""
    seccomp_profile: str = ""
    limits: Mapping[str, int | float] = field(default_factory=dict)   # only the fields asked for
    network: str = ""
    output_files: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    binds: tuple[BindAsk, ...] = ()


@dataclass(frozen=True)
class BatchCase:
    name: str
    stdin: bytes = b""
    limits: Mapping[str, int | float] = field(default_factory=dict)
    files: tuple[InputFile, ...] = ()


@dataclass(frozen=True)
class BatchRequest:
    program: RunRequest
    cases: tuple[BatchCase, ...]
    stop_on_failure: bool = False


@dataclass(frozen=True)
class RequestBounds:
    """Hard bounds on every request field (server config `requests:`). Policies cannot raise them."""

    max_message_bytes: int = spec(64 << 20, doc="largest gRPC message accepted", unit="bytes",
                                  min=1 << 20, max=1 << 30)
    max_argv: int = spec(1024, doc="argv entries", min=1)
    max_arg_bytes: int = spec(64 << 10, doc="bytes of one argv entry", unit="bytes", min=1)
    max_argv_total_bytes: int = spec(1 << 20, doc="bytes of all argv entries", unit="bytes", min=1)
    max_env: int = spec(256, doc="env entries in a request", min=0)
    max_env_bytes: int = spec(32 << 10, doc="bytes of one env name+value", unit="bytes", min=1)
    max_files: int = spec(256, doc="input files (per request, and per batch case)", min=0)
    max_file_bytes: int = spec(32 << 20, doc="bytes of one input file", unit="bytes", min=0)
    max_files_total_bytes: int = spec(48 << 20, doc="bytes of all input files", unit="bytes", min=0)
    max_stdin_bytes: int = spec(32 << 20, doc="bytes of stdin (unary calls, and in total when "
                                "streamed)", unit="bytes", min=0)
    max_output_files: int = spec(64, doc="output files asked for", min=0)
    max_output_file_bytes: int = spec(16 << 20, doc="bytes returned per output file (more is "
                                      "truncated and flagged)", unit="bytes", min=0)
    max_path_bytes: int = spec(1024, doc="bytes of a file name / path", unit="bytes", min=16)
    max_path_depth: int = spec(16, doc="directory levels in a file name", min=1)
    max_labels: int = spec(32, doc="labels", min=0)
    max_label_bytes: int = spec(256, doc="bytes of one label value", unit="bytes", min=1)
    max_binds: int = spec(16, doc="binds asked for", min=0)
    max_batch_cases: int = spec(1000, doc="cases in one ExecuteBatch", min=1)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def check_relative_name(name: str, fld: str, bounds: RequestBounds) -> tuple[str, ...]:
    """A file name relative to the work directory -> its components, or RequestError.

    Refuses what could reach outside the work directory or confuse a reader of the audit log:
    absolute paths, '.'/'..' components, empty components ('a//b', trailing '/'), NUL and other
    control characters. Symlinks are handled where files are opened (never followed).
    """
    if not isinstance(name, str) or not name:
        raise RequestError(fld, "must not be empty")
    if _utf8_len(name) > bounds.max_path_bytes:
        raise RequestError(fld, f"longer than {bounds.max_path_bytes} bytes")
    if "\0" in name:
        raise RequestError(fld, "must not contain NUL")
    if _CONTROL_RE.search(name):
        raise RequestError(fld, "must not contain control characters")
    if name.startswith("/"):
        raise RequestError(fld, f"{name!r} must be relative to the work directory, not absolute")
    parts = tuple(name.split("/"))
    for p in parts:
        if p in ("", ".", ".."):
            raise RequestError(fld, f"{name!r} has an empty, '.' or '..' component; names stay "
                                    "inside the work directory")
        if _utf8_len(p) > 255:
            raise RequestError(fld, "a path component is longer than 255 bytes")
    if len(parts) > bounds.max_path_depth:
        raise RequestError(fld, f"deeper than {bounds.max_path_depth} levels")
    return parts


def _check_abs(path: str, fld: str, bounds: RequestBounds) -> None:
    import os
    if not path.startswith("/") or "\0" in path or path.startswith("//") \
            or os.path.normpath(path) != path:
        raise RequestError(fld, f"{path!r} must be an absolute, normalized path (no '..', '.', "
                                "'//', trailing '/', NUL)")
    if _utf8_len(path) > bounds.max_path_bytes:
        raise RequestError(fld, f"longer than {bounds.max_path_bytes} bytes")
    if _CONTROL_RE.search(path):
        raise RequestError(fld, "must not contain control characters")


def check_limits(limits: Mapping[str, Any], prefix: str) -> None:
    from sandboxd.policy.loader import LIMIT_MINIMUM
    for k, v in limits.items():
        fld = f"{prefix}limits.{k}"
        if k not in REQUESTABLE_LIMITS:
            raise RequestError(fld, "not a limit a request may set")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(fld, "must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise RequestError(fld, "must be finite")
        if v < 0:
            raise RequestError(fld, f"must not be negative, got {v}")
        if v > MAX_SAFE_INT:
            raise RequestError(fld, f"{v} is out of range")
        floor = LIMIT_MINIMUM.get(k)
        if floor is not None and v < floor:
            raise RequestError(fld, f"{v} is below the smallest workable value {floor}")


def check_files(files: tuple[InputFile, ...], prefix: str, bounds: RequestBounds,
                taken: set[tuple[str, ...]] | None = None) -> int:
    """Check input files; returns their total size. `taken` holds names already placed."""
    if len(files) > bounds.max_files:
        raise RequestError(f"{prefix}files", f"{len(files)} files, at most {bounds.max_files}")
    seen: set[tuple[str, ...]] = set(taken or ())
    dirs = {p[:i] for p in seen for i in range(1, len(p))}
    total = 0
    for i, f in enumerate(files):
        fld = f"{prefix}files[{i}]"
        parts = check_relative_name(f.name, fld + ".name", bounds)
        if parts in seen:
            raise RequestError(fld + ".name", f"{f.name!r} is given twice")
        if parts in dirs or any(parts[:j] in seen for j in range(1, len(parts))):
            raise RequestError(fld + ".name", f"{f.name!r} is both a file and a directory")
        seen.add(parts)
        dirs.update(parts[:j] for j in range(1, len(parts)))
        if f.mode & ~0o777:
            raise RequestError(fld + ".mode", f"{oct(f.mode)}: only permission bits (0777) are "
                                              "allowed; no setuid, setgid or sticky")
        if len(f.content) > bounds.max_file_bytes:
            raise RequestError(fld + ".content", f"{len(f.content)} bytes, at most "
                                                 f"{bounds.max_file_bytes}")
        total += len(f.content)
    if taken is not None:
        taken.update(seen)
    return total


def validate_request(req: RunRequest, bounds: RequestBounds, prefix: str = "",
                     allow_stdin: bool = True) -> None:
    """Structural checks of a request against the server's bounds. Raises RequestError."""
    argv = req.argv
    if not argv:
        raise RequestError(f"{prefix}argv", "must name a program (at least one element)")
    if len(argv) > bounds.max_argv:
        raise RequestError(f"{prefix}argv", f"{len(argv)} entries, at most {bounds.max_argv}")
    total = 0
    for i, a in enumerate(argv):
        n = _utf8_len(a)
        if n > bounds.max_arg_bytes:
            raise RequestError(f"{prefix}argv[{i}]", f"{n} bytes, at most {bounds.max_arg_bytes}")
        if "\0" in a:
            raise RequestError(f"{prefix}argv[{i}]", "must not contain NUL")
        total += n
    if not argv[0]:
        raise RequestError(f"{prefix}argv[0]", "must not be empty")
    if total > bounds.max_argv_total_bytes:
        raise RequestError(f"{prefix}argv", f"{total} bytes in all, at most "
                                            f"{bounds.max_argv_total_bytes}")

    if len(req.env) > bounds.max_env:
        raise RequestError(f"{prefix}env", f"{len(req.env)} entries, at most {bounds.max_env}")
    names = set()
    for i, (k, v) in enumerate(req.env):
        fld = f"{prefix}env[{i}]"
        if not _ENV_RE.fullmatch(k):
            raise RequestError(fld + ".name", f"{k[:64]!r} is not a variable name "
                                              "([A-Za-z_][A-Za-z0-9_]*)")
        if k in names:
            raise RequestError(fld + ".name", f"{k} is given twice")
        names.add(k)
        if "\0" in v:
            raise RequestError(fld + ".value", "must not contain NUL")
        if _utf8_len(k) + _utf8_len(v) > bounds.max_env_bytes:
            raise RequestError(fld, f"longer than {bounds.max_env_bytes} bytes")

    if req.cwd:
        _check_abs(req.cwd, f"{prefix}cwd", bounds)

    total_files = check_files(req.files, prefix, bounds)
    if total_files > bounds.max_files_total_bytes:
        raise RequestError(f"{prefix}files", f"{total_files} bytes in all, at most "
                                             f"{bounds.max_files_total_bytes}")
    if req.stdin and not allow_stdin:
        raise RequestError(f"{prefix}stdin", "must be empty here (send stdin in the stream, or per "
                                             "batch case)")
    if len(req.stdin) > bounds.max_stdin_bytes:
        raise RequestError(f"{prefix}stdin", f"{len(req.stdin)} bytes, at most "
                                             f"{bounds.max_stdin_bytes}")
    for fld, v in ((f"{prefix}policy", req.policy), (f"{prefix}seccomp_profile", req.seccomp_profile)):
        if v and not _NAME_RE.fullmatch(v):
            raise RequestError(fld, f"{v[:64]!r} is not a name (lower-case letters, digits, '.', "
                                    "'_', '-')")
    check_limits(req.limits, prefix)
    if req.network and (len(req.network) > 80 or _CONTROL_RE.search(req.network)):
        raise RequestError(f"{prefix}network", "not a network mode")

    if len(req.output_files) > bounds.max_output_files:
        raise RequestError(f"{prefix}output_files", f"{len(req.output_files)} names, at most "
                                                    f"{bounds.max_output_files}")
    outs = set()
    for i, name in enumerate(req.output_files):
        parts = check_relative_name(name, f"{prefix}output_files[{i}]", bounds)
        if parts in outs:
            raise RequestError(f"{prefix}output_files[{i}]", f"{name!r} is asked twice")
        outs.add(parts)

    if len(req.labels) > bounds.max_labels:
        raise RequestError(f"{prefix}labels", f"{len(req.labels)} labels, at most {bounds.max_labels}")
    for k, v in req.labels:
        if not _LABEL_KEY_RE.fullmatch(k):
            raise RequestError(f"{prefix}labels", f"{k[:64]!r} is not a label key ([A-Za-z0-9_.-]{{1,63}})")
        if _utf8_len(v) > bounds.max_label_bytes or _CONTROL_RE.search(v):
            raise RequestError(f"{prefix}labels.{k}", f"longer than {bounds.max_label_bytes} bytes "
                                                      "or has control characters")

    if len(req.binds) > bounds.max_binds:
        raise RequestError(f"{prefix}binds", f"{len(req.binds)} binds, at most {bounds.max_binds}")
    for i, b in enumerate(req.binds):
        _check_abs(b.source, f"{prefix}binds[{i}].source", bounds)
        _check_abs(b.target, f"{prefix}binds[{i}].target", bounds)


def validate_batch(batch: BatchRequest, bounds: RequestBounds) -> None:
    validate_request(batch.program, bounds, prefix="program.", allow_stdin=False)
    if not batch.cases:
        raise RequestError("cases", "at least one case")
    if len(batch.cases) > bounds.max_batch_cases:
        raise RequestError("cases", f"{len(batch.cases)} cases, at most {bounds.max_batch_cases}")
    shared = {tuple(f.name.split("/")) for f in batch.program.files}
    shared_bytes = sum(len(f.content) for f in batch.program.files)
    for i, c in enumerate(batch.cases):
        prefix = f"cases[{i}]."
        if len(c.name) > 128 or _CONTROL_RE.search(c.name):
            raise RequestError(prefix + "name", "longer than 128 characters or has control characters")
        if len(c.stdin) > bounds.max_stdin_bytes:
            raise RequestError(prefix + "stdin", f"{len(c.stdin)} bytes, at most "
                                                 f"{bounds.max_stdin_bytes}")
        check_limits(c.limits, prefix)
        n = check_files(c.files, prefix, bounds, taken=set(shared))
        if shared_bytes + n > bounds.max_files_total_bytes:
            raise RequestError(prefix + "files", f"{shared_bytes + n} bytes with the program's "
                                                 f"files, at most {bounds.max_files_total_bytes}")
