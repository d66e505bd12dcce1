#!/usr/bin/env python3
"""CPU it takes to run a fully isolated /bin/true, back to back: what bounds throughput.

    sudo .venv/bin/python bench/bench_cpu.py [--runs N] [--perf]

Runs N runs of /bin/true through the Python API back to back (after a few warm-up runs, so
spares are staged for the layout) and reports the wall time per run and the whole machine's
CPU time per run from /proc/stat (user and system: every process of the run, the launcher,
the zygote, the host worker, and the kernel's work for them, namespaces and mounts included).
A run's CPU goes mostly into making the next spare, so back to back a run waits for it.

--perf: also sample every CPU with `perf record -e cpu-clock -a` (if perf is installed) and
split the busy time by process name (sbx-launcher, sbx-zygote, sbx-hostworker,
sbx-supervisor, sbx-spawn, sbx-init, sbx-exec (the workload before its execve), the
program). The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_jiffies() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--perf", action="store_true", help="split CPU by process name with perf")
    args = ap.parse_args()
    from sandboxd import planner
    from sandboxd.plan import Status
    from sandboxd.runtime.client import Runtime
    from sandboxd.runtime.config import RuntimeConfig

    perf = shutil.which("perf") if args.perf else None
    if args.perf and not perf:
        print("bench_cpu: perf is not installed; --perf ignored", file=sys.stderr)
    plan = planner.build_plan(["/bin/true"])
    with Runtime(RuntimeConfig(instance=f"benchcpu{os.getpid()}")) as rt:
        for _ in range(5):                    # the layout recurs: spares get staged for it
            rt.run(plan)
            time.sleep(0.1)
        time.sleep(1.0)
        rec = None
        if perf:
            fd, data = tempfile.mkstemp(prefix="bench_cpu-", suffix=".perf")
            os.close(fd)
            rec = subprocess.Popen([perf, "record", "-q", "-e", "cpu-clock", "-F", "1000", "-a",
                                    "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        a = cpu_jiffies()
        t = time.perf_counter()
        for _ in range(args.runs):
            r = rt.run(plan)
            if r.status != Status.OK:
                print(f"bench_cpu: run failed: {r.status}", file=sys.stderr)
                return 1
        wall = time.perf_counter() - t
        b = cpu_jiffies()
        if rec is not None:
            rec.send_signal(2)
            rec.wait()
    hz = os.sysconf("SC_CLK_TCK")
    d = [(y - x) / hz * 1e3 / args.runs for x, y in zip(a, b)]
    user, system, softirq = d[0] + d[1], d[2], d[6]
    print(f"{args.runs} runs back to back: {wall / args.runs * 1e3:.2f} ms per run (wall)")
    print(f"CPU per run, whole machine: {user + system + softirq:.2f} ms "
          f"(user {user:.2f}, system {system:.2f}, softirq {softirq:.2f}); "
          f"{os.cpu_count()} CPUs")
    if rec is not None:
        out = subprocess.run([perf, "report", "-i", data, "--sort", "comm", "--stdio", "-q"],
                             capture_output=True, text=True).stdout
        os.unlink(data)
        rows = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith("%"):
                rows.append((float(parts[0][:-1]), " ".join(parts[1:])))
        busy = sum(p for p, name in rows if name != "swapper")
        print("busy time by process name (perf samples, % of the busy time):")
        for p, name in sorted(rows, reverse=True)[:12]:
            if name != "swapper":
                print(f"  {name:16s} {p / busy * 100:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
