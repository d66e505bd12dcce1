#!/usr/bin/env python3
"""End-to-end Execute of a fully isolated /bin/true through the daemon, beside the runtime alone.

    sudo .venv/bin/python bench/bench_api.py [--runs N] [--clients 1,2,4,8] [--json]

Starts `sandboxd serve` (a separate process, real runtime, unix socket, shipped untrusted-service
policy: every namespace, cgroup, seccomp, Landlock, caps dropped, new root) on a private socket
and state directory, then measures:
  runtime      median of Runtime.run() of the very plan the daemon resolves (Explain), in this
               process: the runtime's own launch time (calls are --pause apart, default 0.1 s, so
               each finds a spare staged for its layout, as a service between bursts does)
  execute      median latency of Execute(/bin/true) over the unix socket, one client, sequential
  overhead     execute / runtime (the issue's goal: under 1.5)
  files        median latency of Execute(/bin/true) with a 4 KiB file in and the same file out
               (adds the run's own size-capped tmpfs work directory)
  runs/s @C    Execute throughput with C concurrent clients (own channel each), for each C
Numbers are a benchmark, not a test: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(base: str, max_running: int) -> str:
    cfg = os.path.join(base, "server.yaml")
    with open(cfg, "w") as f:
        f.write(f"""version: 1
listen: {{unix: {{path: {base}/sandboxd.sock, mode: 0660}}}}
state_dir: {base}/state
policy_dir: {ROOT}/policies
profile_dir: {ROOT}/profiles
audit_log: {base}/audit.jsonl
concurrency: {{max_running: {max_running}, max_queued: 256}}
tenants:
  operator: {{unix_uids: [{os.geteuid()}], default_policy: untrusted-service}}
  web: {{tls_identities: [web]}}
  judge: {{tls_identities: [judge]}}
  policy-author: {{tls_identities: [author]}}
runtime: {{instance: bench}}
""")
    return cfg


def _wait(sock: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    from sandboxd.client import Client, ClientError
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"bench_api: the daemon exited ({proc.returncode})")
        if os.path.exists(sock):
            try:
                with Client(socket=sock, timeout=5) as c:
                    c.host_info()
                    return
            except ClientError:
                pass
        time.sleep(0.05)
    raise SystemExit("bench_api: the daemon did not come up")


def interleaved(fns: dict, n: int, pause: float) -> dict[str, float]:
    """Median ms of each function, sampled round-robin, `pause` seconds before each call so
    both launchers have staged a spare for it (otherwise each call measures the previous
    one's spare being made)."""
    for fn in fns.values():
        for _ in range(3):
            fn()   # warm: channel, launcher spares
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            time.sleep(pause)
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def throughput(sock: str, clients: int, seconds: float) -> float:
    from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
    from sandboxd.client import Client, make_request
    req = make_request(["/bin/true"])
    stop = time.monotonic() + seconds
    counts = [0] * clients
    errors: list[str] = []

    def worker(i: int) -> None:
        with Client(socket=sock, timeout=60) as c:
            c.execute(req)   # warm this channel
            while time.monotonic() < stop:
                r = c.execute(req)
                if r.result.status != pb.STATUS_OK:
                    errors.append(str(r.result.status))
                counts[i] += 1
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise SystemExit(f"bench_api: runs failed: {errors[:3]}")
    return sum(counts) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--clients", default="1,2,4,8", help="concurrency levels for runs/s")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each runs/s level")
    ap.add_argument("--pause", type=float, default=0.1, help="seconds before each sampled call")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",") if x]

    from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
    from sandboxd.client import Client, make_request
    from sandboxd.plan import Plan, Status
    from sandboxd.runtime.client import Runtime, RuntimeConfig

    base = tempfile.mkdtemp(prefix="sbxbench", dir="/tmp")
    os.chmod(base, 0o711)
    cfg = _config(base, max_running=max(levels + [4]))
    proc = subprocess.Popen([sys.executable, "-m", "sandboxd.cli", "serve", "--config", cfg],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(os.path.join(base, "log"), "w"))
    res: dict[str, float] = {}
    try:
        sock = os.path.join(base, "sandboxd.sock")
        _wait(sock, proc)
        with Client(socket=sock, timeout=60) as c, Runtime(RuntimeConfig(instance="benchrt")) as rt:
            req = make_request(["/bin/true"])
            plan = Plan.from_json(c.explain(req).plan_json)
            r = c.execute(req)
            assert r.result.status == pb.STATUS_OK, r
            assert rt.run(plan).status == Status.OK
            # With files in and out: a size-capped tmpfs work directory per run.
            freq = make_request(["/bin/true"], files=[("in.txt", b"x" * 4096)],
                                output_files=["in.txt"])
            # Interleaved, so a change in machine load affects all three alike.
            samples = interleaved({"runtime_ms": lambda: rt.run(plan),
                                   "execute_ms": lambda: c.execute(req),
                                   "execute_files_ms": lambda: c.execute(freq)}, a.runs, a.pause)
            res.update(samples)
        res["overhead_ratio"] = res["execute_ms"] / res["runtime_ms"]
        for n in levels:
            res[f"runs_per_s_{n}_clients"] = throughput(sock, n, a.seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"runtime alone (Runtime.run, same plan)  median {res['runtime_ms']:.2f} ms")
        print(f"Execute over the unix socket           median {res['execute_ms']:.2f} ms  "
              f"({res['overhead_ratio']:.2f}x the runtime)")
        print(f"Execute with a file in and out         median {res['execute_files_ms']:.2f} ms")
        for n in levels:
            print(f"runs/s with {n} concurrent client(s)     {res[f'runs_per_s_{n}_clients']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
