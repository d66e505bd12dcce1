"""A/B of two source trees of sandboxd in one run: which runtime starts /bin/true faster.

On this VM the same benchmark moves by 20% or more from one minute to the next, so two versions
measured one after the other cannot be compared. This runs one client process per tree (each with
its own launcher, started from that tree) and alternates single runs between them, so both see the
same machine.

    git worktree add /tmp/old <commit>; (cd /tmp/old && bash scripts/build_stub.sh)
    .venv/bin/python bench/bench_ab.py /tmp/old . --runs 60              # 100 ms apart
    .venv/bin/python bench/bench_ab.py /tmp/old . --block 30 --blocks 4   # back to back

Each client runs as root like the runtime's own benchmark. Only the trees' Python code and stubs
differ; the interpreter is this one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CLIENT = r"""
import os, sys, time
tree = sys.argv[1]
sys.path.insert(0, tree)
os.environ["PYTHONPATH"] = tree          # the launcher is exec'd: it must import the same tree
from sandboxd import planner
from sandboxd.plan import Status
from sandboxd.runtime.client import Runtime
from sandboxd.runtime.config import RuntimeConfig
rt = Runtime(RuntimeConfig(instance=f"ab{os.getpid()}"))
plan = planner.build_plan(["/bin/true"])
for _ in range(4):                      # the layout recurs: spares get staged for it
    rt.run(plan)
    time.sleep(0.1)
import sandboxd
print(os.path.dirname(os.path.dirname(sandboxd.__file__)), flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    r = rt.run(plan)
    d = time.perf_counter() - t
    if r.status != Status.OK:
        print("error", r.status, flush=True)
        break
    print(f"{d * 1e3:.3f}", flush=True)
rt.close()
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("tree_a")
    ap.add_argument("tree_b")
    ap.add_argument("--runs", type=int, default=60, help="paced runs per tree (alternating)")
    ap.add_argument("--pause", type=float, default=0.1, help="seconds before each paced run")
    ap.add_argument("--block", type=int, default=0, help="back to back: runs per block (0: paced)")
    ap.add_argument("--blocks", type=int, default=4)
    a = ap.parse_args()
    trees = [os.path.abspath(a.tree_a), os.path.abspath(a.tree_b)]
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, t], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/") for t in trees]
    for t, p in zip(trees, procs):
        got = p.stdout.readline().strip()
        if os.path.realpath(got) != os.path.realpath(t):
            raise SystemExit(f"{t}: the client imported sandboxd from {got!r}")
    times: list[list[float]] = [[], []]

    def one(k: int) -> None:
        procs[k].stdin.write("go\n")
        procs[k].stdin.flush()
        line = procs[k].stdout.readline()
        try:
            times[k].append(float(line))
        except ValueError:
            raise SystemExit(f"{trees[k]}: {line.strip() or 'client died'}") from None

    if a.block:
        for _ in range(a.blocks):
            for k in (0, 1):
                time.sleep(1.0)          # both settle: spares restaged between blocks
                for _ in range(a.block):
                    one(k)
    else:
        for _ in range(a.runs):
            for k in (0, 1):
                time.sleep(a.pause)
                one(k)
    for p in procs:
        p.stdin.close()
        p.wait()
    mode = f"back to back, {a.blocks} blocks of {a.block}" if a.block else f"{a.pause * 1e3:.0f} ms apart"
    print(f"{mode}; median (p25-p75) of /bin/true start to result:")
    for t, v in zip(trees, times):
        q = statistics.quantiles(v, n=4)
        print(f"  {t:40s} {statistics.median(v):6.2f} ms ({q[0]:.2f}-{q[2]:.2f})  n={len(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
