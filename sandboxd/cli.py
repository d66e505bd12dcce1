"""Command line: `sandboxd run` (local, no daemon) and the service verbs.

`sandboxd run` exits 0 whenever the sandbox itself worked, whatever the program did; the
program's outcome is in the printed result. It exits 2 on a usage error and 3 when the sandbox
failed (the error names the step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from sandboxd.errors import SandboxError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)
_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'256MiB', '1g', '4096' -> bytes. K/M/G/T are powers of 1024 either way, as judges use them."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 1G, 65536)")
    n, unit = float(m.group(1)), m.group(2).lower()
    return int(n * (1024 ** " kmgt".index(unit or " ")))


def parse_duration_ms(text: str) -> int:
    """'2s', '500ms', '1.5', '2m' -> milliseconds (a bare number is seconds)."""
    m = _TIME.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 2s, 500ms)")
    n, unit = float(m.group(1)), (m.group(2) or "s").lower()
    return int(round(n * {"ms": 1, "s": 1000, "m": 60000}[unit]))


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a program in a sandbox on this machine (no daemon)")
    p.add_argument("--profile", default="default", help="preset: default or judge")
    p.add_argument("--seccomp", help="seccomp profile name or JSON path (overrides the preset's)")
    p.add_argument("--cpu-time", type=parse_duration_ms, help="CPU time limit, all processes (e.g. 2s)")
    p.add_argument("--cpu-extra", type=parse_duration_ms, default=0,
                   help="keep running this long past the CPU limit so the real use is reported")
    p.add_argument("--wall-time", type=parse_duration_ms, help="real time limit (e.g. 5s)")
    p.add_argument("--memory", type=parse_size, help="memory limit (e.g. 256MiB)")
    p.add_argument("--pids", type=int, help="process/thread limit")
    p.add_argument("--stdout-limit", type=parse_size)
    p.add_argument("--stderr-limit", type=parse_size)
    p.add_argument("--file-size", type=parse_size)
    p.add_argument("--stack", type=parse_size)
    p.add_argument("--open-files", type=int)
    p.add_argument("--address-space", type=parse_size)
    p.add_argument("--cpu-quota", type=float, help="CPUs worth of time (e.g. 0.5)")
    p.add_argument("--bind-ro", action="append", default=[], metavar="SRC:DST")
    p.add_argument("--bind-rw", action="append", default=[], metavar="SRC:DST")
    p.add_argument("--work-dir", help="host directory bound writable at /box (default: a private tmpfs)")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--cwd")
    p.add_argument("--stdin", help="file to read stdin from (default: /dev/null)")
    p.add_argument("--stdin-data", help="stdin bytes given on the command line")
    p.add_argument("--no-landlock", action="store_true", help="do not apply Landlock")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--explain", action="store_true", help="print the resolved plan and do not run")
    p.add_argument("--passthrough", action="store_true",
                   help="write the program's stdout/stderr to ours as it runs (result printed to stderr)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)


def cmd_run(a: argparse.Namespace) -> int:
    import dataclasses
    from sandboxd import planner
    from sandboxd.plan import Limits
    from sandboxd.runtime.client import Runtime

    argv = a.argv[1:] if a.argv and a.argv[0] == "--" else a.argv
    if not argv:
        print("sandboxd run: no program given (sandboxd run [options] -- PROGRAM ARGS...)", file=sys.stderr)
        return 2
    base = Limits()
    if a.profile == "judge":
        base = dataclasses.replace(base, pids=16)
    over = {k: v for k, v in {
        "cpu_time_ms": a.cpu_time, "cpu_extra_ms": a.cpu_extra or None, "wall_time_ms": a.wall_time,
        "memory_bytes": a.memory, "pids": a.pids, "stdout_bytes": a.stdout_limit,
        "stderr_bytes": a.stderr_limit, "file_size_bytes": a.file_size, "stack_bytes": a.stack,
        "open_files": a.open_files, "address_space_bytes": a.address_space, "cpu_quota": a.cpu_quota,
    }.items() if v is not None}
    limits = dataclasses.replace(base, **over)
    try:
        binds = tuple(planner.parse_bind(s, writable=False) for s in a.bind_ro) + \
            tuple(planner.parse_bind(s, writable=True) for s in a.bind_rw)
        env = dict(kv.split("=", 1) for kv in a.env)
        plan = planner.build_plan(argv, preset=a.profile, limits=limits, binds=binds, env=env, cwd=a.cwd,
                                  work_host_path=a.work_dir, seccomp_profile=a.seccomp,
                                  landlock=False if a.no_landlock else None)
    except (SandboxError, ValueError) as e:
        print(f"sandboxd run: {e}", file=sys.stderr)
        return 2
    if a.explain:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    stdin: bytes | str | None = a.stdin
    if a.stdin_data is not None:
        stdin = a.stdin_data.encode()
    on_output = None
    if a.passthrough:
        def on_output(name: str, chunk: bytes) -> None:
            stream = sys.stdout.buffer if name == "stdout" else sys.stderr.buffer
            stream.write(chunk)
            stream.flush()
    from sandboxd.runtime.config import RuntimeConfig
    try:
        # A launcher of its own (instance per process), so a running daemon is never disturbed;
        # one spare is enough for one run.
        with Runtime(RuntimeConfig(instance=f"cli{os.getpid()}", prefork=1), start="fork") as rt:
            res = rt.run(plan, stdin=stdin, on_output=on_output)
    except SandboxError as e:
        print(f"sandboxd run: sandbox failed: {e}", file=sys.stderr)
        return 3
    out = sys.stderr if a.passthrough else sys.stdout
    if a.json:
        print(json.dumps(res.to_dict(), indent=2), file=out)
    else:
        print(summary(res), file=out)
    return 0


def summary(res) -> str:  # noqa: ANN001
    lines = [f"status: {res.status.value}"]
    if res.exit_code is not None:
        lines.append(f"exit code: {res.exit_code}")
    if res.signal is not None:
        lines.append(f"signal: {res.signal} ({res.signal_name})")
    lines.append(f"cpu: {res.cpu_time_ms:.1f} ms   wall: {res.wall_time_ms:.1f} ms   "
                 f"peak memory: {res.peak_memory_bytes / 1048576:.1f} MiB")
    if res.kill_reason:
        lines.append(f"killed by sandbox: {res.kill_reason}")
    for d in res.denied_syscalls:
        lines.append(f"denied syscall: {d.name} x{d.count} ({d.action})")
    for name in ("stdout", "stderr"):
        data = getattr(res, name)
        if data:
            flag = " (truncated)" if getattr(res, f"{name}_truncated") else ""
            lines.append(f"--- {name}{flag} ---")
            lines.append(data.decode("utf-8", "backslashreplace").rstrip("\n"))
    return "\n".join(lines)


def cmd_host_info(a: argparse.Namespace) -> int:
    from sandboxd.runtime.client import Runtime
    from sandboxd.runtime.config import RuntimeConfig
    try:
        with Runtime(RuntimeConfig(instance=f"cli{os.getpid()}", prefork=0), start="fork") as rt:
            print(json.dumps(rt.host_info(), indent=2))
    except SandboxError as e:
        print(f"sandboxd host-info: {e}", file=sys.stderr)
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sandboxd", description="security-hardened sandbox service")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_run(sub)
    h = sub.add_parser("host-info", help="what this host can enforce")
    h.set_defaults(func=cmd_host_info)
    try:
        from sandboxd import service_cli
    except ImportError:
        service_cli = None
    if service_cli is not None:
        service_cli.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
