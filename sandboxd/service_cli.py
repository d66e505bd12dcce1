"""The service's command-line verbs: `serve`, `exec`, `explain`, `policy check`, `token new`.

`register(subparsers)` adds them to the main `sandboxd` parser (sandboxd/cli.py). Each handler
returns the exit code:
  serve         0 after a clean shutdown, 1 when it could not start, 2 on bad config/policies
  exec          0 when the sandbox ran (the program's outcome is printed), 2 usage, 3 the call
                failed (the error, its gRPC code and its details are printed); --exit-code exits
                with the program's exit code instead (128+signal; 124 for other non-OK statuses)
  explain       0 allowed, 1 denied, 2 usage / bad policies, 3 the call failed
  policy check  0 when every file is valid, 1 when not (every problem printed, file:line: key: reason)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sandboxd.engine.defaults import DEFAULT_CONFIG, DEFAULT_SOCKET


def _default_config() -> str | None:
    p = os.environ.get("SANDBOXD_CONFIG")
    if p:
        return p
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


# -- argument groups --------------------------------------------------------------------------
def _add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--socket", help=f"daemon's unix socket (default {DEFAULT_SOCKET}, or $SANDBOXD_SOCKET)")
    g.add_argument("--target", help="host:port of a TLS listener (instead of the unix socket)")
    g.add_argument("--ca", help="CA bundle for the server certificate (TLS)")
    g.add_argument("--cert", help="client certificate (mutual TLS)")
    g.add_argument("--key", help="client private key (mutual TLS)")
    g.add_argument("--server-name", help="name to check in the server certificate")
    g.add_argument("--token-file", help="file holding a bearer token (or $SANDBOXD_TOKEN)")
    g.add_argument("--timeout", type=float, help="deadline of the call in seconds (the run is "
                   "killed when it passes)")


def _add_request(p: argparse.ArgumentParser) -> None:
    from sandboxd.cli import parse_duration_ms, parse_size
    g = p.add_argument_group("request")
    g.add_argument("--policy", default="", help="policy to use (default: the tenant's default)")
    g.add_argument("--seccomp", default="", help="seccomp profile, among those the policy allows")
    g.add_argument("--network", default="", help="network mode (default: the policy's)")
    g.add_argument("--cpu-time", type=parse_duration_ms, help="CPU time limit (e.g. 2s)")
    g.add_argument("--wall-time", type=parse_duration_ms, help="real time limit (e.g. 5s)")
    g.add_argument("--memory", type=parse_size, help="memory limit (e.g. 256MiB)")
    g.add_argument("--pids", type=int, help="process/thread limit")
    g.add_argument("--cpu-quota", type=float, help="CPUs worth of time")
    g.add_argument("--stdout-limit", type=parse_size)
    g.add_argument("--stderr-limit", type=parse_size)
    g.add_argument("--file-size", type=parse_size)
    g.add_argument("--open-files", type=int)
    g.add_argument("--stack", type=parse_size)
    g.add_argument("--address-space", type=parse_size)
    g.add_argument("--env", action="append", default=[], metavar="K=V")
    g.add_argument("--cwd", default="")
    g.add_argument("--file", action="append", default=[], metavar="LOCAL[:NAME[:MODE]]",
                   help="put a local file into the work directory (mode in octal, default: "
                        "0755 when the local file is executable, else 0644)")
    g.add_argument("--output", action="append", default=[], metavar="NAME",
                   help="read this file back from the work directory after the run")
    g.add_argument("--output-dir", default=".", help="where --output files are written locally")
    g.add_argument("--stdin", help="file to send as stdin ('-': this process's stdin)")
    g.add_argument("--stdin-data", help="stdin bytes given on the command line")
    g.add_argument("--label", action="append", default=[], metavar="K=V")
    g.add_argument("--bind-ro", action="append", default=[], metavar="SRC:DST")
    g.add_argument("--bind-rw", action="append", default=[], metavar="SRC:DST")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the daemon (gRPC on the unix socket and/or TLS)")
    p.add_argument("--config", default=None, help=f"server config (default $SANDBOXD_CONFIG, or "
                   f"{DEFAULT_CONFIG} when it exists, else built-in defaults)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("exec", help="run a program through the daemon")
    _add_connection(p)
    _add_request(p)
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    p.add_argument("--stream", action="store_true", help="use ExecuteStream: stdin is sent and "
                   "output printed as they happen")
    p.add_argument("--exit-code", action="store_true", help="exit with the program's exit code")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("explain", help="show the policy decision and the resolved plan, run nothing")
    _add_connection(p)
    _add_request(p)
    p.add_argument("--config", help="decide locally with this server config instead of asking the "
                   "daemon (needs --tenant)")
    p.add_argument("--tenant", help="tenant to decide for (local mode)")
    p.add_argument("--json", action="store_true", help="print {decision, plan} as JSON")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("policy", help="policy tools")
    psub = p.add_subparsers(dest="policy_cmd", required=True)
    c = psub.add_parser("check", help="validate policy files: every problem, with file:line and key")
    c.add_argument("paths", nargs="*", help="policy files or directories (default: the config's "
                   "policy_dir)")
    c.add_argument("--config", default=None, help="server config: checks it too, and tenants and "
                   "profiles against it")
    c.add_argument("--profile-dir", help="seccomp/AppArmor profile directory (without --config)")
    c.set_defaults(func=cmd_policy_check)

    p = sub.add_parser("token", help="bearer tokens")
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    t = tsub.add_parser("new", help="print a new random token and the sha256 line for the config")
    t.set_defaults(func=cmd_token_new)


# -- serve ------------------------------------------------------------------------------------
def cmd_serve(a: argparse.Namespace) -> int:
    from sandboxd.api.server import serve
    return serve(a.config or _default_config())


# -- exec ---------------------------------------------------------------------------------------
def _argv(a: argparse.Namespace) -> list[str]:
    return a.argv[1:] if a.argv and a.argv[0] == "--" else list(a.argv)


def _client(a: argparse.Namespace) -> Any:
    from sandboxd.client import TLS, Client
    token = os.environ.get("SANDBOXD_TOKEN")
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip()
    if a.target:
        if not a.ca:
            raise _Usage("--target needs --ca (and --cert/--key for mutual TLS)")
        return Client(a.target, tls=TLS(a.ca, a.cert, a.key, a.server_name), token=token,
                      timeout=a.timeout)
    return Client(socket=a.socket or os.environ.get("SANDBOXD_SOCKET") or DEFAULT_SOCKET,
                  token=token, timeout=a.timeout)


class _Usage(Exception):
    pass


def _kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for kv in items:
        k, sep, v = kv.partition("=")
        if not sep:
            raise _Usage(f"{what} must be K=V, got {kv!r}")
        out[k] = v
    return out


def _request(a: argparse.Namespace, with_stdin: bool = True) -> Any:
    from sandboxd.client import make_request
    argv = _argv(a)
    if not argv:
        raise _Usage("no program given (-- PROGRAM ARGS...)")
    files = []
    for spec in a.file:
        local, _, rest = spec.partition(":")
        name, _, mode = rest.partition(":")
        try:
            with open(local, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _Usage(f"--file {local}: {e.strerror}") from None
        m = int(mode, 8) if mode else (0o755 if os.access(local, os.X_OK) else 0o644)
        files.append((name or os.path.basename(local), data, m))
    stdin = b""
    if with_stdin:
        if a.stdin_data is not None:
            stdin = a.stdin_data.encode()
        elif a.stdin == "-":
            stdin = sys.stdin.buffer.read()
        elif a.stdin:
            with open(a.stdin, "rb") as f:
                stdin = f.read()
    limits = {k: v for k, v in {
        "cpu_time_ms": a.cpu_time, "wall_time_ms": a.wall_time, "memory_bytes": a.memory,
        "pids": a.pids, "cpu_quota": a.cpu_quota, "stdout_bytes": a.stdout_limit,
        "stderr_bytes": a.stderr_limit, "file_size_bytes": a.file_size, "open_files": a.open_files,
        "stack_bytes": a.stack, "address_space_bytes": a.address_space}.items() if v is not None}
    binds = []
    for spec, w in [(s, False) for s in a.bind_ro] + [(s, True) for s in a.bind_rw]:
        src, sep, dst = spec.partition(":")
        if not sep:
            raise _Usage(f"bind must be SRC:DST, got {spec!r}")
        binds.append((os.path.realpath(src), dst, w))
    return make_request(argv, env=_kv(a.env, "--env"), cwd=a.cwd, files=files, stdin=stdin,
                        policy=a.policy, seccomp_profile=a.seccomp, limits=limits,
                        network=a.network, output_files=a.output,
                        labels=_kv(a.label, "--label"), binds=binds)


def _fail(verb: str, e: Exception) -> int:
    from sandboxd.client import ClientError
    if isinstance(e, ClientError):
        print(f"sandboxd {verb}: {e.code.name}: {e.message}", file=sys.stderr)
        if e.details.get("hint"):
            print(f"  hint: {e.details['hint']}", file=sys.stderr)
        return 3
    print(f"sandboxd {verb}: {e}", file=sys.stderr)
    return 2


def _exit_code(r: Any) -> int:
    from sandboxd.api.convert import status_name
    if r.HasField("exit_code") and status_name(r.status) in ("OK", "RUNTIME_ERROR"):
        return r.exit_code
    if r.HasField("signal"):
        return 128 + r.signal
    return 124


def cmd_exec(a: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from sandboxd.cli import summary
    from sandboxd.client import ClientError, to_result
    try:
        req = _request(a, with_stdin=not a.stream)
        client = _client(a)
    except (_Usage, OSError) as e:
        return _fail("exec", e)
    try:
        with client:
            if a.stream:
                resp = None

                def chunks() -> Any:
                    src = sys.stdin.buffer if a.stdin in (None, "-") else open(a.stdin, "rb")
                    if a.stdin_data is not None:
                        yield a.stdin_data.encode()
                        return
                    while True:
                        b = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
                        if not b:
                            return
                        yield b
                for m in client.execute_stream(req, chunks()):
                    kind = m.WhichOneof("kind")
                    if kind == "stdout":
                        sys.stdout.buffer.write(m.stdout)
                        sys.stdout.buffer.flush()
                    elif kind == "stderr":
                        sys.stderr.buffer.write(m.stderr)
                        sys.stderr.buffer.flush()
                    elif kind == "result":
                        resp = m.result
                assert resp is not None
                print(summary(to_result(resp.result)), file=sys.stderr)
            else:
                resp = client.execute(req)
                if a.json:
                    print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
                else:
                    print(summary(to_result(resp.result)))
            for f in resp.result.files:
                if f.error:
                    print(f"output {f.name}: {f.error}", file=sys.stderr)
                    continue
                dst = os.path.join(a.output_dir, os.path.basename(f.name))
                with open(dst, "wb") as out:
                    out.write(f.content)
                note = " (truncated)" if f.truncated else ""
                print(f"output {f.name} -> {dst}{note}", file=sys.stderr)
    except (ClientError, OSError) as e:
        return _fail("exec", e)
    return _exit_code(resp.result) if a.exit_code else 0


# -- explain ------------------------------------------------------------------------------------
def cmd_explain(a: argparse.Namespace) -> int:
    try:
        req = _request(a, with_stdin=False)
    except (_Usage, OSError) as e:
        return _fail("explain", e)
    if a.config or a.tenant:
        return _explain_local(a, req)
    from sandboxd.client import ClientError
    try:
        with _client(a) as c:
            resp = c.explain(req)
    except (ClientError, _Usage, OSError) as e:
        return _fail("explain", e)
    d = resp.decision
    plan = json.loads(resp.plan_json) if resp.plan_json else None
    return _print_decision(a, d.allowed, d.tenant, d.policy, list(d.notes), d.denied_field,
                           d.reason, plan)


def _explain_local(a: argparse.Namespace, req: Any) -> int:
    from sandboxd.api.convert import request_from_pb
    from sandboxd.engine.config import load_all
    from sandboxd.errors import SandboxError
    from sandboxd.policy.engine import explain
    from sandboxd.policy.request import validate_request
    if not a.tenant:
        return _fail("explain", _Usage("local mode needs --tenant"))
    try:
        loaded = load_all(a.config or _default_config())
        r = request_from_pb(req)
        validate_request(r, loaded.config.requests)
        t = loaded.config.tenants.get(a.tenant)
        d = explain(loaded.policies, a.tenant, r, t.default_policy if t else None)
    except SandboxError as e:
        print(f"sandboxd explain: {e}", file=sys.stderr)
        for p in getattr(e, "errors", []):
            print(f"  {p}", file=sys.stderr)
        return 2
    return _print_decision(a, d.allowed, d.tenant, d.policy, list(d.notes), d.denied_field,
                           d.reason, d.plan.to_dict() if d.plan else None)


def _print_decision(a: argparse.Namespace, allowed: bool, tenant: str, policy: str,
                    notes: list[str], field: str, reason: str, plan: Any) -> int:
    if a.json:
        print(json.dumps({"decision": {"allowed": allowed, "tenant": tenant, "policy": policy,
                                       "notes": notes, "denied_field": field, "reason": reason},
                          "plan": plan}, indent=2))
    else:
        print(f"decision: {'ALLOWED' if allowed else 'DENIED'}  tenant={tenant} "
              f"policy={policy or '-'}")
        if not allowed:
            print(f"  {field}: {reason}")
        for n in notes:
            print(f"  {n}")
        if plan is not None:
            print("plan:")
            print(json.dumps(plan, indent=2))
    return 0 if allowed else 1


# -- policy check -------------------------------------------------------------------------------
def cmd_policy_check(a: argparse.Namespace) -> int:
    from sandboxd.engine.config import load_config, load_context, load_policies_for
    from sandboxd.errors import PolicyError
    from sandboxd.policy.loader import LoadContext, load_policy_paths, policy_files
    problems: list[Any] = []
    names: list[str] = []
    cfg_path = a.config or (None if a.paths else _default_config())
    cfg = None
    if cfg_path:
        try:
            cfg = load_config(cfg_path)
        except PolicyError as e:
            problems += e.errors
    try:
        if cfg is not None and not a.paths:
            names = sorted(load_policies_for(cfg, cfg_path).policies)
        elif a.paths or cfg is None:
            paths: list[str] = []
            for p in a.paths or ["policies"]:
                paths += policy_files(p) if os.path.isdir(p) else [p]
            if cfg is not None:
                ctx = load_context(cfg)
            else:
                from sandboxd.planner import PROFILES_DIR
                ctx = LoadContext(profile_dir=a.profile_dir or str(PROFILES_DIR))
            if not paths:
                raise PolicyError("no policy files", errors=["no *.yaml policy files given"])
            names = sorted(load_policy_paths(paths, ctx).policies)
    except PolicyError as e:
        problems += e.errors
    for p in problems:
        print(p)
    if problems:
        print(f"policy check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"policy check: ok ({', '.join(names)})")
    return 0


def cmd_token_new(a: argparse.Namespace) -> int:
    import secrets

    from sandboxd.api.auth import token_hash
    token = secrets.token_urlsafe(32)
    print(f"token:        {token}")
    print(f'token_sha256: "{token_hash(token)}"   # put this under tenants.<name>.token_sha256 (quoted)')
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sandboxd")
    register(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
