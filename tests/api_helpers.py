"""Helpers for the API and policy tests: a fake runtime, test configs and certificates, a server.

FakeRuntime stands in for sandboxd.runtime.client.Runtime in tests of the service layer (auth,
policy, admission, files, streaming, cancellation plumbing). It interprets a handful of commands
in-process. The end-to-end tests (tests/test_api_e2e.py) use the real runtime instead.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sandboxd.errors import LaunchError  # noqa: E402
from sandboxd.plan import Result, Status  # noqa: E402

PROFILES = os.path.join(ROOT, "profiles")


class FakeRuntime:
    """Runs a few commands in-process: true, false, echo, cat, sleep SECONDS, ls, cp, ln, env,
    pwd, launch-fail. Files live in plan.filesystem.work_host_path."""

    def __init__(self) -> None:
        self.plans: list[Any] = []
        self._lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.closed = False
        self.started = threading.Event()   # set when any run starts (for cancellation tests)

    def host_info(self) -> dict[str, Any]:
        return {"fake": True, "landlock": {"abi": 7}, "namespaces": ["user", "pid", "mnt"]}

    def close(self) -> None:
        self.closed = True

    def run(self, plan: Any, stdin: Any = None, on_output: Any = None,
            cancel: threading.Event | None = None) -> Result:
        with self._lock:
            self.plans.append(plan)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            return self._run(plan, stdin, on_output, cancel or threading.Event())
        finally:
            with self._lock:
                self.running -= 1

    def _run(self, plan: Any, stdin: Any, on_output: Any, cancel: threading.Event) -> Result:
        argv = list(plan.argv)
        prog = os.path.basename(argv[0])
        box = plan.filesystem.work_host_path
        out = bytearray()
        t0 = time.monotonic()

        def emit(stream: str, b: bytes) -> None:
            if on_output is not None:
                on_output(stream, b)
            elif stream == "stdout":
                out.extend(b)

        def res(status: Status, code: int | None = 0, **kw: Any) -> Result:
            return Result(status=status, exit_code=code, stdout=bytes(out),
                          wall_time_ms=(time.monotonic() - t0) * 1000, cpu_time_ms=0.1,
                          attestation={"fake": True, "seccomp": plan.seccomp.name if plan.seccomp else None},
                          **kw)
        if prog == "true":
            return res(Status.OK)
        if prog == "false":
            return res(Status.RUNTIME_ERROR, 1)
        if prog == "echo":
            emit("stdout", (" ".join(argv[1:]) + "\n").encode())
            return res(Status.OK)
        if prog == "env":
            emit("stdout", "".join(f"{k}={v}\n" for k, v in plan.env).encode())
            return res(Status.OK)
        if prog == "pwd":
            emit("stdout", (plan.cwd + "\n").encode())
            return res(Status.OK)
        if prog == "cat":
            if isinstance(stdin, (bytes, bytearray)):
                emit("stdout", bytes(stdin))
            elif isinstance(stdin, int):
                while True:
                    b = os.read(stdin, 65536)
                    if not b:
                        break
                    emit("stdout", b)
            elif len(argv) > 1 and box:
                with open(os.path.join(box, argv[1]), "rb") as f:
                    emit("stdout", f.read())
            return res(Status.OK)
        if prog == "sleep":
            secs = float(argv[1])
            wall = plan.limits.wall_time_ms / 1000.0
            if cancel.wait(min(secs, wall)):
                return res(Status.CANCELLED, None, killed_by_sandbox=True, kill_reason="cancelled",
                           signal=9)
            if secs > wall:
                return res(Status.WALL_TIME_LIMIT, None, killed_by_sandbox=True,
                           kill_reason="wall time", signal=9)
            return res(Status.OK)
        if prog == "ls":
            names = []
            for dirpath, dirs, files in os.walk(box):
                for n in files + [d for d in dirs]:
                    names.append(os.path.relpath(os.path.join(dirpath, n), box))
            emit("stdout", "".join(f"{n}\n" for n in sorted(names)).encode())
            return res(Status.OK)
        if prog == "cp":
            shutil.copyfile(os.path.join(box, argv[1]), os.path.join(box, argv[2]))
            return res(Status.OK)
        if prog == "write":   # write NAME TEXT: create a file in the work dir
            with open(os.path.join(box, argv[1]), "w") as f:
                f.write(argv[2] if len(argv) > 2 else "")
            return res(Status.OK)
        if prog == "ln":      # ln -s TARGET NAME
            os.symlink(argv[2], os.path.join(box, argv[3]))
            return res(Status.OK)
        if prog == "mkfifo":
            os.mkfifo(os.path.join(box, argv[1]))
            return res(Status.OK)
        if prog == "launch-fail":
            raise LaunchError("fake launch failure", step="execve", path=argv[0], errno=2)
        return res(Status.RUNTIME_ERROR, 127)


# -- configs ----------------------------------------------------------------------------------
POLICY_SVC = """\
version: 1
name: svc
tenants: [alice, bob, web]
commands: ["*"]
seccomp: {default: default, allowed: [judge]}
env: {set: {PATH: /usr/bin:/bin, HOME: /box}, allow: [LANG, "LC_*"]}
network: {default: none, allowed: [none]}
binds_allowed:
  - {source: %(data)s, target: /data, writable: false}
limits:
  cpu_time_ms: {default: 1000, max: 5000}
  wall_time_ms: {default: 5000, max: 60000}
  memory_bytes: {default: 64Mi, max: 256Mi}
  pids: {default: 16, max: 32}
concurrency: {max_running: %(tenant_running)d, max_queued: %(tenant_queued)d}
"""

POLICY_LAB = """\
version: 1
name: lab
tenants: [alice]
commands: ["/bin/*", "/usr/bin/*"]
seccomp: {default: default}
limits:
  memory_bytes: {default: 64Mi, max: 1Gi}
"""


@dataclass
class Paths:
    base: str
    config: str
    policy_dir: str
    state_dir: str
    socket: str
    audit: str
    data: str


def write_config(base: str, *, tcp: dict[str, Any] | None = None, unix_mode: int = 0o660,
                 token_sha256: str = "", max_running: int = 4, max_queued: int = 64,
                 tenant_running: int = 4, tenant_queued: int = 64, extra_tenants: str = "",
                 policies: dict[str, str] | None = None, unix: bool = True,
                 runtime: dict[str, Any] | None = None) -> Paths:
    os.makedirs(base, exist_ok=True)
    p = Paths(base=base, config=os.path.join(base, "server.yaml"),
              policy_dir=os.path.join(base, "policies"), state_dir=os.path.join(base, "state"),
              socket=os.path.join(base, "run", "sandboxd.sock"),
              audit=os.path.join(base, "audit.jsonl"), data=os.path.join(base, "data"))
    os.makedirs(p.policy_dir, exist_ok=True)
    os.makedirs(p.data, exist_ok=True)
    with open(os.path.join(p.data, "dataset.txt"), "w") as f:
        f.write("data\n")
    vals = {"data": p.data, "tenant_running": tenant_running, "tenant_queued": tenant_queued}
    for name, text in (policies or {"svc.yaml": POLICY_SVC, "lab.yaml": POLICY_LAB}).items():
        with open(os.path.join(p.policy_dir, name), "w") as f:
            f.write(text % vals if "%(" in text else text)
    listen = ""
    if unix:
        listen += f"  unix: {{path: {p.socket}, mode: {oct(unix_mode).replace('0o', '0')}}}\n"
    else:
        listen += "  unix: null\n"
    if tcp:
        listen += "  tcp:\n" + "".join(f"    {k}: {v}\n" for k, v in tcp.items())
    text = textwrap.dedent(f"""\
        version: 1
        listen:
        {textwrap.indent(listen, '        ').strip()}
        state_dir: {p.state_dir}
        policy_dir: {p.policy_dir}
        profile_dir: {PROFILES}
        audit_log: {p.audit}
        concurrency: {{max_running: {max_running}, max_queued: {max_queued}}}
        shutdown_grace_ms: 2000
        tenants:
          alice: {{unix_uids: [0], default_policy: svc}}
          bob: {{token_sha256: ["{token_sha256 or '0' * 64}"]}}
          web: {{tls_identities: [web-client, "spiffe://test/web"]}}
        """)
    text = text.replace("listen:\n", "listen:\n  ", 1) if not text.split("listen:\n", 1)[1].startswith("  ") else text
    if extra_tenants:
        text += textwrap.indent(textwrap.dedent(extra_tenants), "  ")
    if runtime:
        import json
        text += f"runtime: {json.dumps(runtime)}\n"
    with open(p.config, "w") as f:
        f.write(text)
    return p


# -- certificates -------------------------------------------------------------------------------
def make_pki(d: str) -> dict[str, str]:
    """A CA, a server certificate for localhost, client certificates (one per tenant case), and
    a second, unrelated CA with a client certificate of its own. Returns name -> path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    os.makedirs(d, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, str] = {}

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def save(name: str, obj: Any, k: Any = None) -> None:
        path = os.path.join(d, name + ".pem")
        with open(path, "wb") as f:
            f.write(obj.public_bytes(serialization.Encoding.PEM))
        out[name] = path
        if k is not None:
            kp = os.path.join(d, name + ".key")
            with open(kp, "wb") as f:
                f.write(k.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
            out[name + "_key"] = kp

    def ca(name: str) -> tuple[Any, Any]:
        k = key()
        subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        c = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
             .sign(k, hashes.SHA256()))
        return c, k

    def leaf(name: str, cn: str, issuer: tuple[Any, Any], sans: list[Any], server: bool) -> None:
        k = key()
        eku = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(issuer[0].subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        save(name, b.sign(issuer[1], hashes.SHA256()), k)

    root = ca("sandboxd test CA")
    save("ca", root[0])
    other = ca("some other CA")
    save("other_ca", other[0])
    leaf("server", "localhost", root, [x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], True)
    leaf("web", "web-client", root, [], False)
    leaf("web_uri", "not-a-tenant", root, [x509.UniformResourceIdentifier("spiffe://test/web")], False)
    leaf("stranger", "stranger", root, [], False)
    leaf("forged", "web-client", other, [], False)   # right name, wrong CA
    return out


def start_server(paths: Paths, runtime: Any = None) -> Any:
    """An in-process server (real gRPC, real listeners) over `runtime` (FakeRuntime by default)."""
    from sandboxd.api.server import Server
    from sandboxd.engine.config import load_all
    loaded = load_all(paths.config)
    srv = Server(loaded, runtime if runtime is not None else FakeRuntime(), log=lambda s: None)
    srv.start()
    return srv


def work_entries(paths: Paths) -> list[str]:
    d = os.path.join(paths.state_dir, "work")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def short_tmp(prefix: str = "sbx") -> str:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes."""
    import tempfile
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o711)   # sandboxes reach their work directory below it as their own uid
    return d


def remove_tree(d: str) -> None:
    """Remove a test's base directory, unmounting what a crashed server may have left in it."""
    from sandboxd.engine.workdir import mount_points, umount
    for mp in sorted((m for m in mount_points() if m.startswith(d.rstrip("/") + "/")),
                     key=lambda m: m.count("/"), reverse=True):
        umount(mp)
    shutil.rmtree(d, ignore_errors=True)


def wait_serving(socket_path: str, timeout: float = 20.0, proc: Any = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if os.path.exists(socket_path):
            try:
                with grpc.insecure_channel(f"unix:{socket_path}") as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"server on {socket_path} not serving after {timeout}s")


def spawn_server(paths: Paths, fake: bool = True, log: str | None = None) -> Any:
    """Start `sandboxd serve` (over the FakeRuntime, or the real runtime) as a child process."""
    import subprocess
    cmd = ([sys.executable, os.path.join(ROOT, "tests", "api_fake_server.py"), paths.config] if fake
           else [sys.executable, "-m", "sandboxd.cli", "serve", "--config", paths.config])
    out = open(log or os.path.join(paths.base, "server.log"), "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    wait_serving(paths.socket, proc=proc)
    return proc


def audit_records(paths: Paths, event: str | None = None) -> list[dict[str, Any]]:
    import json
    if not os.path.exists(paths.audit):
        return []
    with open(paths.audit) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if event is None or r["event"] == event]


def wait_for(pred: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")
