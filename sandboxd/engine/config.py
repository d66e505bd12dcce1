"""The server configuration file (e.g. config/server.yaml): listeners, tenants, bounds, paths.

Same loader as policies (file:line + key path for every problem, unknown keys rejected). Relative
paths are relative to the config file's directory. `load_all` loads the config and then the policy
directory it names, checking the references between them (tenants, default policies), and returns
both or raises one PolicyError listing everything wrong in either.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from sandboxd.engine.defaults import DEFAULT_SOCKET
from sandboxd.errors import PolicyError
from sandboxd.policy.loader import LoadContext, PolicySet, _under_bad, load_policy_dir
from sandboxd.policy.request import RequestBounds
from sandboxd.policy.schema import NAME_DOC, NAME_PATTERN
from sandboxd.policy.source import Problem, parse_yaml
from sandboxd.policy.validate import spec, validate_partial

_HOSTPORT_RE = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


@dataclass(frozen=True)
class UnixListen:
    path: str = spec(DEFAULT_SOCKET, doc="socket path")
    mode: int = spec(0o660, doc="socket file permissions (YAML 0660 is octal)", min=0, max=0o777)
    group: str | None = spec(None, doc="group owning the socket (members may connect); null: keep")
    max_connections: int = spec(256, doc="open client connections; more are closed at once", min=1)


@dataclass(frozen=True)
class TcpListen:
    address: str = spec(doc="host:port to listen on", pattern=_HOSTPORT_RE.pattern,
                        pattern_doc="host:port")
    cert: str = spec(doc="server certificate chain (PEM)")
    key: str = spec(doc="server private key (PEM)")
    client_ca: str | None = spec(None, doc="CA bundle client certificates must chain to")
    require_client_cert: bool = spec(True, doc="mutual TLS: refuse clients without a valid "
                                     "certificate (false: bearer tokens are the only identity)")


@dataclass(frozen=True)
class Listen:
    unix: UnixListen | None = spec(default_factory=UnixListen, doc="unix socket listener; null: off")
    tcp: TcpListen | None = spec(None, doc="TLS listener; null: off")


@dataclass(frozen=True)
class Tenant:
    unix_uids: tuple[int, ...] = spec((), doc="peer uids on the unix socket that are this tenant "
                                      "(SO_PEERCRED)", item_min=0, item_max=2**32 - 2, unique=True)
    token_sha256: tuple[str, ...] = spec((), doc="sha256 (hex) of bearer tokens that are this "
                                         "tenant; `sandboxd token hash` prints one",
                                         item_pattern=r"[0-9a-f]{64}",
                                         item_pattern_doc="64 lower-case hex digits", unique=True)
    tls_identities: tuple[str, ...] = spec((), doc="client certificate subject CN or SAN (DNS, URI) "
                                           "values that are this tenant", unique=True)
    default_policy: str | None = spec(None, doc="policy used when a request names none",
                                      pattern=NAME_PATTERN, pattern_doc=NAME_DOC)


@dataclass(frozen=True)
class Concurrency:
    max_running: int = spec(4, doc="sandboxes running at once, all tenants", min=1)
    max_queued: int = spec(64, doc="requests waiting for a slot, all tenants; beyond it "
                           "RESOURCE_EXHAUSTED", min=0)


@dataclass(frozen=True)
class Metrics:
    listen: str | None = spec(None, doc="host:port for Prometheus /metrics over HTTP; null: off",
                              pattern=_HOSTPORT_RE.pattern, pattern_doc="host:port")


@dataclass(frozen=True)
class ServerConfig:
    version: int = spec(doc="schema version of this file", choices=(1,))
    listen: Listen = spec(default_factory=Listen, doc="listeners")
    state_dir: str = spec("/run/sandboxd", doc="work directories, lock and private sockets; "
                          "removed leftovers on start")
    policy_dir: str = spec("/etc/sandboxd/policies", doc="directory of policy *.yaml files")
    profile_dir: str = spec("/etc/sandboxd/profiles", doc="holds seccomp/<name>.json and "
                            "apparmor/<name>")
    audit_log: str | None = spec("/var/log/sandboxd/audit.jsonl", doc="audit log (JSON lines); "
                                 "\"-\": stderr; null: off")
    metrics: Metrics = spec(default_factory=Metrics, doc="Prometheus metrics")
    concurrency: Concurrency = spec(default_factory=Concurrency, doc="global concurrency")
    requests: RequestBounds = spec(default_factory=RequestBounds, doc="hard bounds on request fields")
    shutdown_grace_ms: int = spec(10_000, doc="on SIGTERM, how long running sandboxes may finish "
                                  "before they are killed", min=0)
    work_dir_tmpfs: bool = spec(True, doc="give each run's host work directory its own size-capped "
                                "tmpfs (needs root); false: plain directories, not size-capped "
                                "(a workload could fill the state_dir file system)")
    reflection: bool = spec(True, doc="serve gRPC server reflection (for grpcurl)")
    tenants: dict[str, Tenant] = spec(default_factory=dict, doc="tenants by name; nobody else is "
                                      "authenticated", key_pattern=NAME_PATTERN, key_pattern_doc=NAME_DOC)
    runtime: dict[str, Any] = spec(default_factory=dict, doc="keyword arguments for "
                                   "sandboxd.runtime.client.RuntimeConfig")


@dataclass(frozen=True)
class Loaded:
    config: ServerConfig
    policies: PolicySet
    config_path: str | None


def _resolve_paths(cfg: ServerConfig, base: str) -> ServerConfig:
    def r(p: str | None) -> str | None:
        return None if p is None or p == "-" else os.path.normpath(os.path.join(base, p))
    listen = cfg.listen
    if listen.unix is not None:
        listen = dataclasses.replace(listen, unix=dataclasses.replace(listen.unix, path=r(listen.unix.path)))
    if listen.tcp is not None:
        t = listen.tcp
        listen = dataclasses.replace(listen, tcp=dataclasses.replace(
            t, cert=r(t.cert), key=r(t.key), client_ca=r(t.client_ca)))
    return dataclasses.replace(cfg, listen=listen, state_dir=r(cfg.state_dir),
                               policy_dir=r(cfg.policy_dir), profile_dir=r(cfg.profile_dir),
                               audit_log=cfg.audit_log if cfg.audit_log in (None, "-") else r(cfg.audit_log))


def parse_config(text: str, file: str, base_dir: str | None = None) -> ServerConfig:
    doc, problems = parse_yaml(text, file)
    cfg = None
    if doc is not None:
        cfg, p, bad = validate_partial(ServerConfig, doc)
        problems += p
        if cfg is not None:
            problems += [x for x in _check_config(cfg, doc) if not _under_bad(x.key_path, bad)]
    if problems or cfg is None:
        problems.sort(key=lambda p: (p.file, p.line, p.column))
        raise PolicyError(f"{len(problems)} problem(s) in the server config", step="load_config",
                          path=file, errors=problems)
    return _resolve_paths(cfg, base_dir if base_dir is not None else os.path.dirname(os.path.abspath(file)))


def _check_config(cfg: ServerConfig, doc: Any) -> list[Problem]:
    out: list[Problem] = []
    seen: dict[tuple[str, Any], str] = {}
    for name, t in cfg.tenants.items():
        for kind, values in (("unix_uids", t.unix_uids), ("token_sha256", t.token_sha256),
                             ("tls_identities", t.tls_identities)):
            for i, v in enumerate(values):
                if (kind, v) in seen:
                    out.append(doc.problem(("tenants", name, kind, i),
                                           f"{v!r} already identifies tenant '{seen[(kind, v)]}': "
                                           "an identity must name exactly one tenant"))
                seen[(kind, v)] = name
        if not (t.unix_uids or t.token_sha256 or t.tls_identities):
            out.append(doc.problem(("tenants", name), "no identity (unix_uids, token_sha256 or "
                                                      "tls_identities): nobody can be this tenant"))
    tcp = cfg.listen.tcp
    if tcp is not None:
        if tcp.require_client_cert and not tcp.client_ca:
            out.append(doc.problem(("listen", "tcp", "client_ca"),
                                   "mutual TLS needs client_ca (or set require_client_cert: false "
                                   "and use bearer tokens)"))
        m = _HOSTPORT_RE.fullmatch(tcp.address)
        if m and int(m.group(2)) > 65535:   # 0: any free port (tests)
            out.append(doc.problem(("listen", "tcp", "address"), "port out of range"))
    if cfg.listen.unix is None and tcp is None:
        out.append(doc.problem(("listen",), "no listener: enable unix or tcp"))
    if cfg.runtime:
        try:
            from sandboxd.runtime.client import RuntimeConfig
        except ImportError:
            RuntimeConfig = None   # checked when the runtime exists
        if RuntimeConfig is not None and dataclasses.is_dataclass(RuntimeConfig):
            names = {f.name for f in dataclasses.fields(RuntimeConfig)}
            for k in cfg.runtime:
                if k not in names:
                    out.append(doc.problem(("runtime", k), f"unknown RuntimeConfig key (known: "
                                                           f"{', '.join(sorted(names))})", key=True))
    return out


def load_config(path: str) -> ServerConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise PolicyError(f"cannot read server config: {e.strerror}", step="load_config", path=path,
                          errno=e.errno, errors=[Problem(path, 0, 0, "", f"cannot read: {e.strerror}")])
    return parse_config(text, path)


def load_context(cfg: ServerConfig) -> LoadContext:
    forbidden = [cfg.state_dir]
    if cfg.listen.unix is not None:
        forbidden.append(os.path.dirname(cfg.listen.unix.path))
    # Segments exist where the runtime is configured with them (runtime.network.segments).
    segments = frozenset(((cfg.runtime or {}).get("network") or {}).get("segments") or {})
    return LoadContext(profile_dir=cfg.profile_dir, known_tenants=frozenset(cfg.tenants),
                       forbidden_sources=tuple(forbidden), segments=segments)


def load_policies_for(cfg: ServerConfig, config_file: str | None = None) -> PolicySet:
    """Load cfg.policy_dir checked against cfg; also checks each tenant's default_policy."""
    problems: list[Problem] = []
    policies = None
    try:
        policies = load_policy_dir(cfg.policy_dir, load_context(cfg))
    except PolicyError as e:
        problems += e.errors
    if policies is not None:
        for name, t in cfg.tenants.items():
            if t.default_policy and name not in policies.policies.get(
                    t.default_policy, _NoPolicy).spec.tenants:
                problems.append(Problem(config_file or "<server config>", 0, 0,
                                        f"tenants.{name}.default_policy",
                                        f"policy '{t.default_policy}' does not exist or does not "
                                        f"name tenant '{name}'"))
    if problems:
        raise PolicyError(f"{len(problems)} problem(s) in policy files", step="load_policies",
                          errors=problems)
    assert policies is not None
    return policies


class _NoPolicy:
    class spec:   # noqa: N801 - a stand-in with no tenants
        tenants: tuple[str, ...] = ()


def load_all(config_path: str | None) -> Loaded:
    """The server config (or built-in defaults when None) and its policies."""
    cfg = load_config(config_path) if config_path else parse_config("version: 1\n", "<defaults>", "/")
    return Loaded(cfg, load_policies_for(cfg, config_path), config_path)
