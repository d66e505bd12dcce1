#!/usr/bin/env python3
"""Where the time of a network-enabled run goes: namespace creation, attach, detach.

    sudo .venv/bin/python bench/bench_network.py [--runs N] [--json]

Measures (median / p95 / max over N):
  netns_create      fork a child that unshares CLONE_NEWNET and stops, minus a plain fork:
                    the cost a `none` run pays for its own network namespace
  netns_teardown    from SIGKILL of the last process in a namespace to the kernel having
                    destroyed its veth (asynchronous, in a kernel workqueue: not on our path)
  owned_build       first attach of a NetworkManager: owned namespace, sysctls, nft load and
                    read-back (two `nft` processes), bridges, uplink veth. Once per launcher
  attach            one `segment` attach: veth pair into the run's netns, address, route,
                    hosts file rewrite
  detach            one detach (disconnect + hosts file), with the batch deletion amortized in
  flush_batch       destroying a batch of detached veth pairs (veth_delete_batch of them)
  runtime_none      (if the runtime is importable) the runtime's own `none` run of /bin/true,
                    for scale: a `segment` run costs about runtime_none + attach + detach
Stand-in sandboxes are forked children in fresh network namespaces (their creation is not
counted in attach). The "outside" is a namespace the bench creates. Numbers depend on the
machine and its load: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sandboxd.network import NetworkManager, nsutil, parse_network_config  # noqa: E402
from sandboxd.network.rtnl import Rtnl  # noqa: E402
from sandboxd.plan import NetworkPlan  # noqa: E402


def stats(ts: list[float]) -> dict[str, float]:
    ts = sorted(ts)
    return {"median_ms": statistics.median(ts) * 1e3,
            "p95_ms": ts[min(len(ts) - 1, int(len(ts) * 0.95))] * 1e3,
            "max_ms": ts[-1] * 1e3, "n": len(ts)}


def fork_stopped(new_netns: bool) -> int:
    """A child that (optionally) unshares its network namespace, then stops itself."""
    pid = os.fork()
    if pid == 0:
        try:
            if new_netns and nsutil._libc.unshare(nsutil.CLONE_NEWNET) != 0:
                os._exit(1)
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    return pid


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def bench_netns_create(n: int) -> dict[str, float]:
    plain, netns = [], []
    for _ in range(n):
        t = time.perf_counter()
        pid = fork_stopped(False)
        plain.append(time.perf_counter() - t)
        kill(pid)
        t = time.perf_counter()
        pid = fork_stopped(True)
        netns.append(time.perf_counter() - t)
        kill(pid)
    delta = [b - a for a, b in zip(sorted(plain), sorted(netns))]
    return stats(delta)


def make_outside() -> str:
    path = f"/run/netns/sbxbench-{secrets.token_hex(3)}"
    os.makedirs("/run/netns", exist_ok=True)
    home = nsutil.open_netns("/proc/thread-self/ns/net")
    fd = nsutil.create_named_netns(path, home)
    with Rtnl.inside(fd, home, "outside") as r:
        r.set_up(1, "lo")
        r.add_address(1, "lo", ipaddress.IPv4Interface("198.51.100.10/32"))
    os.close(fd)
    os.close(home)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_network: needs root (network namespaces, veth, nftables)", file=sys.stderr)
        return 2

    res: dict[str, object] = {}
    res["netns_create"] = bench_netns_create(a.runs)

    outside = make_outside()
    state = tempfile.mkdtemp(prefix="sbxbench-")
    cfg = parse_network_config({
        "state_dir": state, "uplink": {"netns": outside},
        "segments": {"a": {"subnet": "10.231.0.0/20", "egress": [
            {"cidr": "198.51.100.10/32", "ports": [8080]}]},
                     "b": {"subnet": "10.232.0.0/24"}},
    }, "bench")
    plan = NetworkPlan(mode="segment", segment="a")
    try:
        builds = []
        for i in range(5):
            with NetworkManager(f"bench{i}", cfg) as m:
                m.cleanup_stale()
                pid = fork_stopped(True)
                t0 = time.perf_counter()
                m._ensure()
                builds.append(time.perf_counter() - t0)
                kill(pid)
        res["owned_build"] = stats(builds)

        with NetworkManager("bench", cfg) as m:
            m.cleanup_stale()
            m._ensure()
            att, det, flushes = [], [], []
            real_flush = m.flush

            def timed_flush() -> None:
                t = time.perf_counter()
                real_flush()
                flushes.append(time.perf_counter() - t)
            m.flush = timed_flush                     # type: ignore[method-assign]
            # warm-up (first use of each netlink message class)
            pid = fork_stopped(True)
            m.attach("warm", f"/proc/{pid}/ns/net", plan, name="warm")
            m.detach("warm")
            kill(pid)
            for i in range(a.runs):
                pid = fork_stopped(True)
                t = time.perf_counter()
                m.attach(f"r{i}", f"/proc/{pid}/ns/net", plan, name=f"m{i}")
                att.append(time.perf_counter() - t)
                t = time.perf_counter()
                m.detach(f"r{i}")
                det.append(time.perf_counter() - t)
                kill(pid)
            res["attach"] = stats(att)
            res["detach"] = stats(det)
            if flushes:
                res["flush_batch"] = stats(flushes) | {"batch": cfg.veth_delete_batch}

            # Teardown latency: kill the run's last process, wait for the kernel to destroy
            # the veth pair (its owned-side end disappears).
            tear = []
            for i in range(min(a.runs, 20)):
                pid = fork_stopped(True)
                m.attach(f"t{i}", f"/proc/{pid}/ns/net", plan, name=f"t{i}")
                veth = m._members[f"t{i}"].veth
                t = time.perf_counter()
                kill(pid)
                while m._rt.link_index(veth) is not None:
                    time.sleep(0.0005)
                tear.append(time.perf_counter() - t)
                m.detach(f"t{i}")
            res["netns_teardown"] = stats(tear)
    finally:
        nsutil.remove_named_netns(outside, missing_ok=True)

    try:
        from sandboxd import planner
        from sandboxd.runtime.client import Runtime
        p = planner.build_plan(["/bin/true"])
        with Runtime() as rt:
            rt.run(p)
            ts = []
            for _ in range(min(a.runs, 50)):
                t = time.perf_counter()
                rt.run(p)
                ts.append(time.perf_counter() - t)
        res["runtime_none"] = stats(ts)
    except Exception as e:                                     # noqa: BLE001 - optional
        res["runtime_none"] = {"error": f"{type(e).__name__}: {e}"}

    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'what':<16}{'median ms':>10}{'p95 ms':>9}{'max ms':>9}{'n':>6}")
    for k, v in res.items():
        if "error" in v:                                          # type: ignore[operator]
            print(f"{k:<16} unavailable: {v['error']}")           # type: ignore[index]
            continue
        extra = f"  (batch of {v['batch']})" if "batch" in v else ""  # type: ignore[operator]
        print(f"{k:<16}{v['median_ms']:>10.2f}{v['p95_ms']:>9.2f}{v['max_ms']:>9.2f}"  # type: ignore[index]
              f"{v['n']:>6}{extra}")                              # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
