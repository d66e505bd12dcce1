"""`sandboxd serve`: the daemon's listeners, its life and its signals.

Start-up order: load config and policies (refuse to start on any problem), start the runtime,
lock the state directory and remove a previous instance's leftovers (Core.start), then listen:
gRPC on a private unix socket behind the public one (unix_front, for SO_PEERCRED) and/or on TCP
with TLS. Health (grpc.health.v1) and reflection are served beside the Sandbox service.

Signals: SIGHUP reloads config and policies (a bad reload keeps the old ones and logs why);
SIGTERM/SIGINT shut down gracefully: health goes NOT_SERVING, no new connections or runs, running
sandboxes get shutdown_grace_ms to finish, then are cancelled (killed), then everything is removed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sandboxd.api.auth import Authenticator
from sandboxd.api.servicer import SERVICE_NAME, SandboxServicer
from sandboxd.api.unix_front import UnixFront
from sandboxd.engine.config import Loaded, load_all
from sandboxd.engine.metrics import MetricsServer
from sandboxd.engine.service import Core
from sandboxd.errors import SandboxError


def _handlers(s: SandboxServicer) -> grpc.GenericRpcHandler:
    """Method table. Requests arrive as raw bytes (the servicer parses them, see servicer.py)."""
    def uu(fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None,
                                                   response_serializer=lambda m: m.SerializeToString())
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Execute": uu(s.Execute),
        "ExecuteBatch": uu(s.ExecuteBatch),
        "Explain": uu(s.Explain),
        "ValidatePolicy": uu(s.ValidatePolicy),
        "HostInfo": uu(s.HostInfo),
        "ExecuteStream": grpc.stream_stream_rpc_method_handler(
            s.ExecuteStream, request_deserializer=None,
            response_serializer=lambda m: m.SerializeToString()),
    })


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SandboxError(f"cannot read the {what}", step="listen_tcp", path=path,
                           errno=e.errno) from None


class Server:
    def __init__(self, loaded: Loaded, runtime: Any, *, log: Callable[[str], None] | None = None) -> None:
        """runtime: a Runtime, or a callable making one once the state directory is locked."""
        self.log = log or (lambda s: print(f"sandboxd: {s}", file=sys.stderr, flush=True))
        self.core = Core(loaded, runtime, log=self.log)
        cfg = loaded.config
        private = os.path.join(cfg.state_dir, "private")
        self.internal_socket = os.path.join(private, "grpc.sock")
        self.peer_dir = os.path.join(private, "peers")
        self.auth = Authenticator(lambda: self.core.state.config,
                                  self.peer_dir if cfg.listen.unix else None)
        self.servicer = SandboxServicer(self.core, self.auth)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.grpc_server: grpc.Server | None = None
        self.front: UnixFront | None = None
        self.metrics_server: MetricsServer | None = None
        self.tcp_port: int | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def start(self) -> None:
        cfg = self.core.state.config
        self.core.start()   # lock + crash recovery + work root
        c = cfg.concurrency
        # Threads: every admitted or queued run holds one; a few more for Explain/health/etc.
        workers = c.max_running + c.max_queued + 16
        opts = [("grpc.max_receive_message_length", cfg.requests.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0)]   # never share a port with another daemon
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                             options=opts, maximum_concurrent_rpcs=workers)
        server.add_generic_rpc_handlers((_handlers(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if cfg.listen.unix is not None:
            private = os.path.dirname(self.internal_socket)
            os.makedirs(private, mode=0o700, exist_ok=True)
            os.chmod(private, 0o700)   # only the daemon may reach gRPC directly (see unix_front)
            if server.add_insecure_port(f"unix:{self.internal_socket}") == 0:
                raise SandboxError("cannot listen", step="listen_internal", path=self.internal_socket)
        if cfg.listen.tcp is not None:
            t = cfg.listen.tcp
            creds = grpc.ssl_server_credentials(
                [(_read(t.key, "TLS key"), _read(t.cert, "TLS certificate"))],
                root_certificates=_read(t.client_ca, "client CA") if t.client_ca else None,
                require_client_auth=t.require_client_cert)
            port = server.add_secure_port(t.address, creds)
            if port == 0:
                raise SandboxError("cannot listen", step="listen_tcp", path=t.address)
            self.tcp_port = port
        server.start()
        self.grpc_server = server
        if cfg.listen.unix is not None:
            u = cfg.listen.unix
            self.front = UnixFront(u.path, u.mode, u.group, self.internal_socket, self.peer_dir,
                                   u.max_connections, self.log)
            self.front.start()
        if cfg.metrics.listen:
            self.metrics_server = MetricsServer(self.core.metrics, cfg.metrics.listen)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        where = []
        if cfg.listen.unix is not None:
            where.append(f"unix:{cfg.listen.unix.path}")
        if self.tcp_port is not None:
            where.append(f"tls:{cfg.listen.tcp.address.rpartition(':')[0]}:{self.tcp_port}")
        if self.metrics_server:
            where.append(f"metrics http://{self.metrics_server.address}/metrics")
        self.log(f"serving on {', '.join(where)}; policies: "
                 f"{', '.join(sorted(self.core.state.policies.policies))}")

    def reload(self) -> bool:
        ok, _ = self.core.reload()
        return ok

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        cfg = self.core.state.config
        grace = cfg.shutdown_grace_ms / 1000.0 if grace_s is None else grace_s
        self.log(f"shutting down (grace {grace:g}s)")
        self.health.enter_graceful_shutdown()
        if self.front is not None:
            self.front.stop_accepting()
        # Core.shutdown lets runs finish for `grace`, then cancels the rest; gRPC's own grace is
        # a little longer so the cancelled runs can still send their (CANCELLED) results.
        done = self.grpc_server.stop(grace + 5.0) if self.grpc_server else None
        self.core.shutdown(grace)
        if done is not None:
            done.wait(grace + 10.0)
        if self.front is not None:
            self.front.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.grpc_server is not None:   # only what this instance created
            self._cleanup_sockets()
        self.log("stopped")

    def _cleanup_sockets(self) -> None:
        import shutil
        shutil.rmtree(os.path.dirname(self.internal_socket), ignore_errors=True)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def make_runtime(loaded: Loaded) -> Any:
    from sandboxd.runtime.client import Runtime, RuntimeConfig
    return Runtime(RuntimeConfig(**loaded.config.runtime))


def serve(config_path: str | None, *, runtime: Any = None,
          ready: Callable[[Server], None] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code."""
    log = lambda s: print(f"sandboxd: {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        loaded = load_all(config_path)
    except SandboxError as e:
        log(f"cannot start: {e}")
        for p in getattr(e, "errors", []):
            log(f"  {p}")
        return 2
    rt = runtime if runtime is not None else (lambda: make_runtime(loaded))
    server = Server(loaded, rt, log=log)
    try:
        server.start()
    except SandboxError as e:
        log(f"cannot start: {e}")
        server.stop(0)
        return 1
    stop_requested = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop_requested.set()

    def on_hup(signum: int, frame: Any) -> None:
        threading.Thread(target=server.reload, name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    if ready is not None:
        ready(server)
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0
