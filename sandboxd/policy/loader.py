"""Policy files -> a validated, resolved PolicySet, or every problem at once.

Steps, kept apart: parse (source.parse_yaml), validate against the schema (validate.validate),
check cross-field rules and names against the host and the server (here, `_check`), then compile
what can be resolved once (seccomp profile digests, system binds) so the per-request engine only
decides. Nothing is half-loaded: the caller gets a PolicySet only when there were no problems, and
otherwise a PolicyError whose `errors` list holds every Problem, sorted by file and line.

Built-in example policies load through this same code, so a broken default fails the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from sandboxd.errors import PolicyError
from sandboxd.plan import Bind, FilesystemPlan, SeccompPlan, Tmpfs
from sandboxd.planner import system_filesystem
from sandboxd.policy.schema import (ENV_NAME_PATTERN, NULLABLE_LIMITS, FloatLimit, IntLimit,
                                    LimitsSpec, PolicySpec)
from sandboxd.policy.source import Document, Path, Problem, parse_yaml
from sandboxd.policy.validate import validate_partial

MAX_POLICY_FILE_BYTES = 1 << 20

# Every capability the kernel defines (linux/capability.h, up to CAP_CHECKPOINT_RESTORE = 40).
KNOWN_CAPABILITIES = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
})

# Host paths no policy may bind, because each hands the workload a way around the sandbox:
# "/" is the whole host; /proc and /sys expose host kernel interfaces and other processes; /dev
# gives raw devices (the runtime builds a minimal /dev itself). The server adds its own state
# and socket directories (the daemon's socket would let the workload call the daemon).
ALWAYS_FORBIDDEN_SOURCES = ("/proc", "/sys", "/dev")
# Sandbox paths the runtime owns: a bind there would hide or replace what it sets up.
RESERVED_TARGETS = ("/proc", "/dev")
# ... except these, which policies may mount over (POSIX shared memory is a tmpfs by design).
RESERVED_EXCEPTIONS = ("/dev/shm",)

# Lowest sensible value per limit; below it a run cannot even start, so it is a mistake, not a
# choice. Applies to policy values and to what a request asks for.
LIMIT_MINIMUM: Mapping[str, float] = MappingProxyType({
    "cpu_time_ms": 1, "wall_time_ms": 1, "memory_bytes": 1 << 20, "pids": 1, "cpu_quota": 0.01,
    "open_files": 3, "stack_bytes": 64 << 10,
})

_ENV_PATTERN_RE = re.compile(r"[A-Za-z0-9_*?\[\]]+")
_SEGMENT_RE = re.compile(r"segment:([a-z0-9][a-z0-9._-]{0,62})")


@dataclass(frozen=True)
class LoadContext:
    """What a policy is checked against beyond its own text."""

    profile_dir: str                                  # holds seccomp/<name>.json, apparmor/<name>
    known_tenants: frozenset[str] | None = None       # None: tenants are not checked (no server config)
    segments: frozenset[str] = frozenset()            # network segments the server defines (none yet)
    forbidden_sources: tuple[str, ...] = ()           # server paths no bind may expose


@dataclass(frozen=True)
class CompiledPolicy:
    spec: PolicySpec
    file: str
    seccomp: Mapping[str, SeccompPlan]               # every allowed profile name -> its resolved plan
    # The host-derived filesystem every run of this policy starts from: system binds, symlinks
    # and generated /etc files (sandboxd.planner, shared with `sandboxd run`), the policy's own
    # binds, tmpfs mounts and symlinks. The engine adds requested binds and the work directory.
    fs_base: FilesystemPlan


@dataclass(frozen=True)
class PolicySet:
    policies: Mapping[str, CompiledPolicy]
    by_tenant: Mapping[str, tuple[str, ...]]
    files: tuple[str, ...] = ()
    digest: str = ""                                 # sha256 over every file's text, for the audit log

    def for_tenant(self, tenant: str) -> tuple[str, ...]:
        return self.by_tenant.get(tenant, ())


EMPTY_POLICY_SET = PolicySet(MappingProxyType({}), MappingProxyType({}))


# ---------------------------------------------------------------------------------------------
def policy_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise PolicyError(f"cannot read policy directory: {e.strerror}", step="load_policies",
                          path=directory, errno=e.errno,
                          errors=[Problem(directory, 0, 0, "", f"cannot read directory: {e.strerror}")])
    return [os.path.join(directory, n) for n in names if n.endswith((".yaml", ".yml"))
            and not n.startswith(".")]


def load_policy_dir(directory: str, ctx: LoadContext) -> PolicySet:
    files = policy_files(directory)
    if not files:
        raise PolicyError("no policy files", step="load_policies", path=directory,
                          errors=[Problem(directory, 0, 0, "", "no *.yaml policy files here; "
                                          "with no policy every request is denied")])
    return load_policy_paths(files, ctx)


def load_policy_paths(paths: Iterable[str], ctx: LoadContext) -> PolicySet:
    items = []
    problems = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                raw = f.read(MAX_POLICY_FILE_BYTES + 1)
        except OSError as e:
            problems.append(Problem(p, 0, 0, "", f"cannot read: {e.strerror}"))
            continue
        items.append((p, raw))
    return load_policy_texts(items, ctx, _problems=problems)


def load_policy_texts(items: Iterable[tuple[str, str | bytes]], ctx: LoadContext,
                      _problems: list[Problem] | None = None) -> PolicySet:
    """Load (file name, text) pairs together. Raises PolicyError listing every problem."""
    problems = list(_problems or [])
    specs: list[tuple[PolicySpec, Document]] = []
    digest = hashlib.sha256()
    files = []
    for name, text in items:
        files.append(name)
        if isinstance(text, bytes):
            if len(text) > MAX_POLICY_FILE_BYTES:
                problems.append(Problem(name, 0, 0, "", f"larger than {MAX_POLICY_FILE_BYTES} bytes"))
                continue
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem(name, 0, 0, "", f"not UTF-8 text (byte {e.start})"))
                continue
        if len(text) > MAX_POLICY_FILE_BYTES:
            problems.append(Problem(name, 0, 0, "", f"larger than {MAX_POLICY_FILE_BYTES} bytes"))
            continue
        digest.update(hashlib.sha256(name.encode() + b"\0" + text.encode()).digest())
        doc, p = parse_yaml(text, name)
        problems.extend(p)
        if doc is None:
            continue
        spec, p, bad = validate_partial(PolicySpec, doc)
        problems.extend(p)
        if spec is not None:
            specs.append((spec, doc, bad, bool(p)))

    resolver = _Resolver(ctx)
    compiled: dict[str, CompiledPolicy] = {}
    first_seen: dict[str, tuple[str, int]] = {}
    for spec, doc, bad, schema_failed in specs:
        # Cross-field checks run on what was valid, so one pass reports everything; a problem
        # under a part that was already invalid would only repeat it, and is dropped.
        found: list[Problem] = []
        _check(spec, doc, ctx, found)
        seccomp = resolver.seccomp_for(spec, doc, found)
        if ("name",) not in bad:
            if spec.name in first_seen:
                f, line = first_seen[spec.name]
                found.append(doc.problem(("name",), f"policy name '{spec.name}' is already used "
                                                    f"by {f}:{line}"))
            else:
                first_seen[spec.name] = (doc.file, doc.where(("name",))[0])
        found = [x for x in found if not _under_bad(x.key_path, bad)]
        problems.extend(found)
        if not found and not schema_failed:
            compiled[spec.name] = CompiledPolicy(spec, doc.file, MappingProxyType(seccomp),
                                                 resolver.filesystem(spec))
    if problems:
        problems.sort(key=lambda p: (p.file, p.line, p.column, p.key_path))
        raise PolicyError(f"{len(problems)} problem(s) in policy files", step="load_policies",
                          errors=problems)
    by_tenant: dict[str, list[str]] = {}
    for name, cp in sorted(compiled.items()):
        for t in cp.spec.tenants:
            by_tenant.setdefault(t, []).append(name)
    return PolicySet(MappingProxyType(compiled),
                     MappingProxyType({t: tuple(v) for t, v in by_tenant.items()}),
                     tuple(files), digest.hexdigest())


def _under_bad(key_path: str, bad: set[Path]) -> bool:
    from sandboxd.policy.source import format_path
    for b in bad:
        if not b:
            continue
        fp = format_path(b)
        if key_path == fp or key_path.startswith(fp + ".") or key_path.startswith(fp + "["):
            return True
    return False


# ---------------------------------------------------------------------------------------------
def is_clean_abs(p: str) -> bool:
    """Absolute, normalized (no '.', '..', '//', trailing '/'), no NUL."""
    return (p.startswith("/") and "\0" not in p and not p.startswith("//")
            and os.path.normpath(p) == p)


def is_within(path: str, base: str) -> bool:
    return path == base or base == "/" or path.startswith(base.rstrip("/") + "/")


def _check(spec: PolicySpec, doc: Document, ctx: LoadContext, out: list[Problem]) -> None:
    """Cross-field and name checks; each appends a Problem and goes on."""

    def bad(path: Path, reason: str) -> None:
        out.append(doc.problem(path, reason))

    def abs_path(path: Path, p: str) -> bool:
        if not is_clean_abs(p):
            bad(path, f"{p!r} must be an absolute, normalized path (no '..', '.', '//' or trailing '/')")
            return False
        return True

    if ctx.known_tenants is not None:
        for i, t in enumerate(spec.tenants):
            if t not in ctx.known_tenants:
                known = ", ".join(sorted(ctx.known_tenants)) or "none"
                bad(("tenants", i), f"unknown tenant '{t}' (server config tenants: {known})")

    for i, c in enumerate(spec.capabilities):
        if c not in KNOWN_CAPABILITIES:
            close = difflib.get_close_matches(c.upper(), sorted(KNOWN_CAPABILITIES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            bad(("capabilities", i), f"unknown capability '{c}'{hint}")

    for i, pat in enumerate(spec.commands):
        if not pat or "\0" in pat:
            bad(("commands", i), "a command pattern must be a non-empty glob")

    # Network: only "none" exists today. host and segments are refused at load time, so that a
    # policy written for them fails now rather than silently running without network isolation.
    for i, mode in enumerate(spec.network.allowed):
        _check_network_mode(mode, ("network", "allowed", i), ctx, bad, spec.network.allow_host)
    if spec.network.default not in spec.network.allowed:
        bad(("network", "default"), f"'{spec.network.default}' is not in network.allowed "
                                    f"({', '.join(spec.network.allowed)})")

    # Limits: nullability, minimums, default <= max.
    for name in LimitsSpec.__dataclass_fields__:
        lim = getattr(spec.limits, name)
        if not isinstance(lim, (IntLimit, FloatLimit)):
            continue
        path = ("limits", name)
        nulls = [p for p in ("default", "max") if getattr(lim, p) is None]
        if name not in NULLABLE_LIMITS and nulls:
            for part in nulls:
                bad(path + (part,), "may not be null: this limit cannot be switched off")
        elif lim.default is None and lim.max is not None:
            bad(path + ("default",), f"null (unlimited) is above max {lim.max}; give a default")
        if lim.default is not None and lim.max is not None and lim.default > lim.max:
            bad(path + ("default",), f"{lim.default} is above max {lim.max}")
        floor = LIMIT_MINIMUM.get(name)
        if floor is not None:
            for part in ("default", "max"):
                v = getattr(lim, part)
                if v is not None and v < floor:
                    bad(path + (part,), f"{v} is below the smallest workable value {floor}")

    u = spec.user
    if u.uid_mode == "single" and not u.allow_single_uid:
        bad(("user", "uid_mode"), "uid_mode single maps every run to one host uid, so concurrent "
                                  "runs could signal each other; set user.allow_single_uid: true to "
                                  "accept that")

    if spec.apparmor.profile is not None:
        p = os.path.join(ctx.profile_dir, "apparmor", spec.apparmor.profile)
        if not os.path.isfile(p):
            bad(("apparmor", "profile"), f"unknown AppArmor profile '{spec.apparmor.profile}' "
                                         f"(no file {p})")

    ll = spec.landlock
    for key in ("extra_read", "extra_write"):
        for i, p in enumerate(getattr(ll, key)):
            abs_path(("landlock", key, i), p)

    fs = spec.filesystem
    if abs_path(("filesystem", "work_dir"), fs.work_dir) and fs.work_dir == "/":
        bad(("filesystem", "work_dir"), "the work directory cannot be the root")
    if fs.cwd is not None:
        abs_path(("filesystem", "cwd"), fs.cwd)
    forbidden = ALWAYS_FORBIDDEN_SOURCES + tuple(ctx.forbidden_sources)
    for i, b in enumerate(fs.binds):
        path = ("filesystem", "binds", i)
        _check_bind_source(b.source, path + ("source",), forbidden, abs_path, bad,
                           must_exist=not b.optional)
        _check_target(b.target, path + ("target",), abs_path, bad)
    for i, t in enumerate(fs.tmpfs):
        _check_target(t.target, ("filesystem", "tmpfs", i, "target"), abs_path, bad)
    for target, text in fs.symlinks.items():
        if abs_path(("filesystem", "symlinks", target), target) and not text:
            bad(("filesystem", "symlinks", target), "the link text must not be empty")

    for i, b in enumerate(spec.binds_allowed):
        path = ("binds_allowed", i)
        _check_bind_source(b.source, path + ("source",), forbidden, abs_path, bad, must_exist=True)
        _check_target(b.target, path + ("target",), abs_path, bad)

    for i, pat in enumerate(spec.env.allow):
        if not _ENV_PATTERN_RE.fullmatch(pat):
            bad(("env", "allow", i), f"{pat!r} is not a variable-name glob (letters, digits, _, * ?)")
    for name in spec.env.set:
        if not re.fullmatch(ENV_NAME_PATTERN, name):
            bad(("env", "set", name), "not an environment variable name")


def _check_network_mode(mode: str, path: Path, ctx: LoadContext, bad: Any,
                        allow_host: bool = False) -> None:
    if mode == "none":
        return
    if mode == "host":
        if not allow_host:
            bad(path, "network mode 'host' gives up network isolation: the policy must say "
                      "network.allow_host: true to allow it")
        return
    m = _SEGMENT_RE.fullmatch(mode)
    if m:
        if m.group(1) not in ctx.segments:
            known = ", ".join(sorted(ctx.segments)) or "none are configured"
            bad(path, f"unknown network segment '{m.group(1)}' ({known})")
        return
    bad(path, f"unknown network mode {mode!r} (one of: none, host, segment:NAME)")


def _check_bind_source(src: str, path: Path, forbidden: Iterable[str], abs_path: Any, bad: Any,
                       must_exist: bool) -> None:
    if not abs_path(path, src):
        return
    if src == "/":
        bad(path, "binding the host's root would expose the whole host")
        return
    real = os.path.realpath(src)
    for f in forbidden:
        if is_within(src, f) or is_within(real, f) or is_within(f, real):
            bad(path, f"{src!r} is never bindable: it exposes {f} (host kernel interfaces, "
                      f"devices, or the daemon's own state)")
            return
    if must_exist and not os.path.exists(src):
        bad(path, f"{src!r} does not exist on this host (set optional: true if it may be absent)")


def _check_target(target: str, path: Path, abs_path: Any, bad: Any) -> None:
    if not abs_path(path, target):
        return
    if target == "/":
        bad(path, "cannot mount over the sandbox's root")
        return
    for r in RESERVED_TARGETS:
        if is_within(target, r) and not any(is_within(target, x) for x in RESERVED_EXCEPTIONS):
            bad(path, f"{target!r} is inside {r}, which the runtime builds itself")
            return


class _Resolver:
    """Resolve names to host objects once per load: profiles (digest) and the system layout."""

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self._profiles: dict[str, SeccompPlan | str] = {}
        self._layout: tuple[tuple[Bind, ...], tuple[tuple[str, str], ...]] | None = None

    def seccomp_for(self, spec: PolicySpec, doc: Document, out: list[Problem]) -> dict[str, SeccompPlan]:
        plans: dict[str, SeccompPlan] = {}
        names = [(("seccomp", "default"), spec.seccomp.default)]
        names += [(("seccomp", "allowed", i), n) for i, n in enumerate(spec.seccomp.allowed)]
        for path, name in names:
            r = self._profile(name)
            if isinstance(r, str):
                out.append(doc.problem(path, r))
            else:
                from dataclasses import replace
                plans[name] = replace(r, report_denials=spec.seccomp.report_denials)
        return plans

    def _profile(self, name: str) -> SeccompPlan | str:
        if name in self._profiles:
            return self._profiles[name]
        d = os.path.join(self.ctx.profile_dir, "seccomp")
        path = os.path.abspath(os.path.join(d, name + ".json"))
        r: SeccompPlan | str
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            try:
                known = sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json"))
            except OSError:
                known = []
            r = (f"unknown seccomp profile '{name}' (no file {path}; known: "
                 f"{', '.join(known) or 'none'})")
        except OSError as e:
            r = f"cannot read seccomp profile {path}: {e.strerror}"
        else:
            problem = _validate_seccomp_profile(path, raw)
            r = problem if problem else SeccompPlan(name=name, path=path,
                                                    sha256=hashlib.sha256(raw).hexdigest())
        self._profiles[name] = r
        return r

    def filesystem(self, spec: PolicySpec) -> FilesystemPlan:
        fs = spec.filesystem
        if fs.system_binds:
            base = system_filesystem(work_dir=fs.work_dir, work_size_bytes=fs.work_size_bytes,
                                     hostname=fs.hostname, uid=spec.user.inside_uid,
                                     gid=spec.user.inside_gid)
        else:
            base = FilesystemPlan(work_dir=fs.work_dir, work_size_bytes=fs.work_size_bytes)
        binds = list(base.binds)
        for b in fs.binds:
            if b.optional and not os.path.exists(b.source):
                continue
            binds.append(Bind(source=os.path.realpath(b.source), target=b.target,
                              writable=b.writable, optional=b.optional))
        # The policy's tmpfs and symlinks win over the system defaults for the same target.
        tmpfs = {t.target: t for t in base.tmpfs}
        tmpfs.update({t.target: Tmpfs(target=t.target, size_bytes=t.size_bytes, mode=t.mode)
                      for t in fs.tmpfs})
        links = dict(base.symlinks)
        links.update(fs.symlinks)
        return dataclasses.replace(
            base, binds=tuple(binds), tmpfs=tuple(tmpfs.values()),
            symlinks=tuple(sorted(links.items())), proc=fs.proc, dev_nodes=tuple(fs.dev_nodes),
            root_readonly=fs.root_readonly)


def _validate_seccomp_profile(path: str, raw: bytes) -> str | None:
    """Validate a seccomp profile with the runtime's own loader; None when good, else the reason."""
    try:
        from sandboxd.runtime.seccomp import load_profile  # the runtime's validator, when present
    except ImportError:
        load_profile = None
    if load_profile is not None:
        try:
            load_profile(path)
        except Exception as e:   # any failure of the profile is a problem to report, not a crash
            return f"invalid seccomp profile {path}: {e}"
        return None
    # Minimal structural check until the runtime's validator exists.
    try:
        data = json.loads(raw)
    except ValueError as e:
        return f"invalid seccomp profile {path}: not JSON ({e})"
    if not isinstance(data, dict) or "defaultAction" not in data:
        return f"invalid seccomp profile {path}: no defaultAction"
    return None


def env_name_allowed(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
