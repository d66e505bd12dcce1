"""Prometheus metrics in the text exposition format, without a client library.

Counters, gauges and histograms with labels, a render() to text, and a tiny HTTP server for
/metrics. Kept small on purpose: the daemon exposes a handful of series (runs by status and
tenant, run latency, queue depth, sandbox kills) and needs no registry machinery.
"""

from __future__ import annotations

import http.server
import math
import threading
from typing import Callable, Iterable


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_esc(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw) -> None:   # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + by

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help)
        self._fn = fn

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self._fn())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 buckets: Iterable[float] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                             10, 30, 60)) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._data: dict[tuple[str, ...], list[float]] = {}   # counts per bucket + [sum, count]

    def observe(self, v: float, *labels: str) -> None:
        with self._lock:
            d = self._data.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if v <= b:
                    d[i] += 1
            d[-2] += v
            d[-1] += 1

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for k, d in items:
            for i, b in enumerate(self.buckets):
                le = 'le="' + _fmt(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {_fmt(d[i])}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_fmt(d[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {_fmt(d[-1])}")
        return out


class Metrics:
    """The daemon's series. `queue_depth` and `running` read the admission controller live."""

    def __init__(self, running: Callable[[], float] = lambda: 0,
                 queued: Callable[[], float] = lambda: 0) -> None:
        self.runs = Counter("sandboxd_runs_total", "Runs finished, by tenant and workload status.",
                            ("tenant", "status"))
        self.rejections = Counter("sandboxd_rejections_total", "Requests refused before running, "
                                  "by tenant and error kind.", ("tenant", "kind"))
        self.errors = Counter("sandboxd_sandbox_errors_total", "Runs the sandbox itself failed "
                              "(launch errors, host capability), by tenant and error kind.",
                              ("tenant", "kind"))
        self.kills = Counter("sandboxd_sandbox_kills_total", "Runs the sandbox killed (limits, "
                             "cgroup OOM, cancellation), by reason.", ("tenant", "reason"))
        self.oom_kills = Counter("sandboxd_cgroup_oom_kills_total", "Processes OOM-killed by run "
                                 "memory cgroups.", ("tenant",))
        self.latency = Histogram("sandboxd_request_duration_seconds", "End-to-end handling time of "
                                 "run requests, queueing included.", ("method",))
        self.run_time = Histogram("sandboxd_run_wall_seconds", "Wall time of workloads.", ())
        self.reloads = Counter("sandboxd_policy_reloads_total", "Policy reloads by result.", ("result",))
        self.queue_depth = Gauge("sandboxd_queue_depth", "Requests waiting for a slot.", queued)
        self.running = Gauge("sandboxd_running", "Sandboxes running now.", running)
        self._all = [self.runs, self.rejections, self.errors, self.kills, self.oom_kills, self.latency,
                     self.run_time, self.reloads, self.queue_depth, self.running]

    def render(self) -> str:
        lines: list[str] = []
        for m in self._all:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves GET /metrics on host:port in a daemon thread."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        host, _, port = address.rpartition(":")
        m = metrics

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:   # noqa: N802
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = m.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
