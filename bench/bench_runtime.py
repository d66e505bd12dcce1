#!/usr/bin/env python3
"""Start-to-exit time of a fully isolated /bin/true, side by side, in one run.

    sudo .venv/bin/python bench/bench_runtime.py [--runs N]

Measures the median of N runs each for:
  floor        plain fork+exec of /bin/true (subprocess, posix_spawn/vfork path)
  unshare      unshare -Urpnmif --fork true (util-linux)
  bwrap        bubblewrap with every namespace, caps dropped, ro /usr, fresh /proc and /dev
  floor_paced, bwrap_paced  the same 100 ms apart (as api_ready_spare is): like with like
  api          sandboxd through its Python API (Runtime.run), default profile: all namespaces,
               cgroup, seccomp, Landlock, caps dropped, new root; runs back to back
  api_ready_spare  the same, 100 ms apart, so a spare staged for the layout is ready for each run
  api_new_layout   100 ms apart, each run a layout never seen (another hostname): a generic
               spare builds its root and stages itself during the run
  cli          sandboxd through its CLI (`sandboxd run -- /bin/true`: interpreter + launcher start)
and runs per second with 2 concurrent workers through the API. Ratios are to the floor.
Numbers are a benchmark, not a test: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def median_ms(fn, n: int, pause: float = 0.0) -> float:
    fn()  # warm
    ts = []
    for _ in range(n):
        if pause:
            time.sleep(pause)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from sandboxd import planner
    from sandboxd.plan import Status
    from sandboxd.runtime.client import Runtime

    res: dict[str, float] = {}
    res["floor"] = median_ms(lambda: subprocess.run(["/bin/true"], check=True), a.runs)
    res["unshare"] = median_ms(lambda: subprocess.run(["unshare", "-Urpnmif", "--fork", "true"], check=True), a.runs)
    if shutil.which("bwrap"):
        bw = ["bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
        for d in ("/bin", "/lib", "/lib64", "/sbin"):
            if os.path.islink(d):
                bw += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                bw += ["--ro-bind", d, d]
        bw += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", "/bin/true"]
        res["bwrap"] = median_ms(lambda: subprocess.run(bw, check=True), a.runs)
        # The same, 100 ms apart like api_ready_spare: on a VM an idle CPU wakes slowly, so a
        # paced run costs more for everyone; these rows compare like with like.
        res["bwrap_paced"] = median_ms(lambda: subprocess.run(bw, check=True), max(20, a.runs // 4), 0.1)
    res["floor_paced"] = median_ms(lambda: subprocess.run(["/bin/true"], check=True), max(20, a.runs // 4), 0.1)
    plan = planner.build_plan(["/bin/true"])
    from sandboxd.runtime.config import RuntimeConfig
    with Runtime(RuntimeConfig(instance=f"bench{os.getpid()}")) as rt:
        def api() -> None:
            r = rt.run(plan)
            assert r.status == Status.OK, r
        res["api"] = median_ms(api, a.runs)

        def api_after_pause() -> None:     # a ready spare: the launcher had time to make one
            time.sleep(0.1)
            t = time.perf_counter()
            api()
            paused.append(time.perf_counter() - t)
        paused: list[float] = []
        for _ in range(max(20, a.runs // 4)):
            api_after_pause()
        res["api_ready_spare"] = statistics.median(paused) * 1e3
        fresh: list[float] = []
        for i in range(max(20, a.runs // 4)):
            time.sleep(0.1)
            p2 = planner.build_plan(["/bin/true"], hostname=f"bench{i}")
            t = time.perf_counter()
            r = rt.run(p2)
            fresh.append(time.perf_counter() - t)
            assert r.status == Status.OK, r
        res["api_new_layout"] = statistics.median(fresh) * 1e3
        # throughput with 2 workers
        n_each = max(10, a.runs // 2)
        t = time.perf_counter()
        ths = [threading.Thread(target=lambda: [api() for _ in range(n_each)]) for _ in range(2)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        res["api_runs_per_s_2_workers"] = 2 * n_each / (time.perf_counter() - t)
    cli = [sys.executable, "-m", "sandboxd.cli", "run", "--", "/bin/true"]
    res["cli"] = median_ms(lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL), max(10, a.runs // 5))
    floor = res["floor"]
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'what':<28}{'median ms':>10}{'x floor':>9}")
    for k in ("floor", "unshare", "bwrap", "api", "floor_paced", "bwrap_paced", "api_ready_spare",
              "api_new_layout", "cli"):
        if k in res:
            print(f"{k:<28}{res[k]:>10.2f}{res[k] / floor:>9.1f}")
    print(f"{'api runs/s, 2 workers':<28}{res['api_runs_per_s_2_workers']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
