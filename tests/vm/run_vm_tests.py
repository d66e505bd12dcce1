#!/usr/bin/env python3
"""Boot the VM tier and run its tests inside, as root; bring pytest's outcome back.

Theory of operation. virtme-ng boots Debian's stock kernel (unpacked by scripts/setup-vm.sh
into .cache/vm-kernel: AppArmor on, pure cgroup v2 with every controller) under QEMU without
KVM. The guest's root is this machine's own filesystem, shared read-only over 9p (with
throw-away tmpfs overlays on /etc, /tmp, /var, ...), so the guest runs this very checkout with
this very venv. One directory is shared writable, the results directory: the guest's pytest
writes junit.xml and its exit status there, and this script reads them after the VM powers off.
One boot runs every test of the selection (tests/vm/SELECTION), because a boot costs ~30 s.

Exit status: 0 the guest's pytest passed; 1 it ran and failed; 2 the VM did not run it to the end
(boot failure, timeout, crash: no exit status came back); 3 the tier is not set up here (what is
missing is printed: run scripts/setup.sh --test). summary.json in the results directory says the
same for tests/test_vm_tier.py.

Usage: tests/vm/run_vm_tests.py [--results DIR] [--timeout S] [--memory 2G] [--cpus 2]
                                [--check] [-- PYTEST_ARGS...]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, ".venv")
KERNEL_DIR = os.path.join(ROOT, ".cache", "vm-kernel")
DEFAULT_RESULTS = os.path.join(ROOT, ".cache", "vm-results")
SELECTION_FILE = os.path.join(ROOT, "tests", "vm", "SELECTION")
# AppArmor is built into Debian's kernel and on by default; saying so keeps the tier honest if a
# later kernel changes the default. cgroup_no_v1=all leaves every controller to cgroup v2 (the
# guest has no systemd to decide, virtme-ng's init mounts cgroup2 at /sys/fs/cgroup).
KERNEL_CMDLINE = ("apparmor=1", "security=apparmor", "systemd.unified_cgroup_hierarchy=1",
                  "cgroup_no_v1=all")
DEFAULT_TIMEOUT_S = 420      # one boot (it takes ~3 minutes); two must stay well under 15 minutes
# The guest prints a dot per test (each takes seconds, the whole selection ~2 minutes). Silence
# this long means the emulated guest stalled: once in ~8 boots on 2026-11-28 it stopped at the
# cpu.max test with even pytest-timeout's alarm never firing (the guest kernel's timers stopped),
# which no test of ours can cause or catch. Such a boot is killed and the tier booted once more;
# test failures are never retried.
STALL_S = 180
ATTEMPTS = 2
EXIT_PASSED, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def kernel_image() -> str | None:
    imgs = sorted(glob.glob(os.path.join(KERNEL_DIR, "boot", "vmlinuz-*")))
    return imgs[-1] if imgs else None


def preflight() -> list[str]:
    """What is missing to run the tier here, each with what provides it. Empty: ready."""
    missing = []
    if not os.path.exists(os.path.join(VENV, "bin", "vng")):
        missing.append("virtme-ng (.venv/bin/vng: pip install -e '.[test]')")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (apt: qemu-system-x86)")
    if kernel_image() is None:
        missing.append(f"the guest kernel ({KERNEL_DIR}/boot/vmlinuz-*: scripts/setup-vm.sh)")
    elif not glob.glob(os.path.join(KERNEL_DIR, "lib", "modules", "*", "modules.dep")):
        missing.append(f"modules.dep for the guest kernel ({KERNEL_DIR}: scripts/setup-vm.sh)")
    for tool, pkg in (("busybox", "busybox-static"), ("modprobe", "kmod"), ("file", "file"),
                      ("apparmor_parser", "apparmor")):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            missing.append(f"{tool} (apt: {pkg})")
    if not any(os.path.exists(p) for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")):
        missing.append("systemd-udevd (apt: udev): the guest's output channels need it")
    return missing


def selection() -> list[str]:
    """The test paths the guest runs: tests/vm/SELECTION, one path or node id per line."""
    out = []
    with open(SELECTION_FILE, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            item = line.split("#", 1)[0].strip()
            if not item:
                continue
            path = item.split("::", 1)[0]
            if os.path.isabs(path) or not os.path.exists(os.path.join(ROOT, path)):
                raise SystemExit(f"{SELECTION_FILE}:{n}: {item!r} is not a path in the repository")
            out.append(item)
    if not out:
        raise SystemExit(f"{SELECTION_FILE}: selects no tests")
    return out


def guest_script(results: str, pytest_args: list[str]) -> str:
    """The shell script the guest runs (as root). It writes the exit status last, so a status
    file means pytest ran to its end."""
    py = os.path.join(VENV, "bin", "python")
    # Plugin autoload off: under emulation importing hypothesis's plugin alone costs ~20 s.
    # pytest-timeout is loaded explicitly (pyproject sets a per-test timeout).
    args = ["-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_timeout", "-q", "-ra",
            f"--junitxml={results}/junit.xml", "-o", "junit_family=xunit2",
            *selection(), *pytest_args]
    env = {
        "SANDBOXD_VM_TIER": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "PYTHONDONTWRITEBYTECODE": "1",    # the checkout is read-only in the guest
        "CI": os.environ.get("CI", ""),
        "HOME": "/root",
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    return f"""set -u
{exports}
cd {shlex.quote(ROOT)}
# Facts about the guest, for the summary and for whoever reads a failure.
{{ echo "kernel=$(uname -r)"; echo "lsm=$(cat /sys/kernel/security/lsm 2>/dev/null)";
   echo "apparmor=$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)";
   echo "cgroup2_controllers=$(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null)";
   echo "cgroup_v1_mounts=$(grep -c ' cgroup ' /proc/self/mounts)"; }} > {results}/guest-info.txt
# The operator's part of cgroup v2 delegation: the root cgroup hands its controllers to its
# children (sandboxd never writes to a cgroup it did not create).
echo "+memory +pids +cpu +cpuset" > /sys/fs/cgroup/cgroup.subtree_control
{shlex.quote(py)} {' '.join(shlex.quote(a) for a in args)}
echo $? > {results}/exit_status.tmp && mv {results}/exit_status.tmp {results}/exit_status
"""


def parse_junit(path: str) -> dict:
    """Counts and the names of failed/errored/skipped tests from pytest's junit XML."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0,
           "failed_tests": [], "skipped_tests": [], "test_names": []}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        out["junit_error"] = str(e)
        return out
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        out["tests"] += 1
        out["test_names"].append(name)
        if case.find("failure") is not None:
            out["failures"] += 1
            out["failed_tests"].append(name)
        elif case.find("error") is not None:
            out["errors"] += 1
            out["failed_tests"].append(name)
        elif case.find("skipped") is not None:
            sk = case.find("skipped")
            out["skipped"] += 1
            out["skipped_tests"].append(f"{name}: {sk.get('message', '')}")
        else:
            out["passed"] += 1
    return out


def run(results: str, timeout: float, memory: str, cpus: int, pytest_args: list[str]) -> dict:
    """Boot the tier; boot it once more if the guest stalled or timed out without an exit
    status (never when its tests failed). The summary names every attempt."""
    earlier: list[dict] = []
    for attempt in range(1, ATTEMPTS + 1):
        s = _boot(results, timeout, memory, cpus, pytest_args)
        if s["outcome"] != "incomplete" or attempt == ATTEMPTS:
            break
        with open(os.path.join(results, "console.log"), "rb") as f:
            tail = f.read()[-3000:].decode(errors="replace")
        earlier.append({k: s[k] for k in ("elapsed_s", "timed_out", "stalled")} | {"console_tail": tail})
        print(f"\nvm-tier: attempt {attempt} brought no exit status back "
              f"({'stalled: no output for %d s' % STALL_S if s['stalled'] else 'timed out'} after "
              f"{s['elapsed_s']} s); booting again", file=sys.stderr)
    s["attempts"] = len(earlier) + 1
    s["earlier_attempts"] = earlier
    with open(os.path.join(results, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(s, f, indent=2)
    return s


def _boot(results: str, timeout: float, memory: str, cpus: int, pytest_args: list[str]) -> dict:
    # Only our own files live here: start from an empty directory every time, so a stale
    # junit.xml can never pass for this run's.
    if os.path.isdir(results):
        shutil.rmtree(results)
    os.makedirs(results)
    script = os.path.join(results, "guest.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write(guest_script(results, pytest_args))
    cmd = [os.path.join(VENV, "bin", "vng"), "--run", kernel_image(), "--disable-kvm",
           "--memory", memory, "--cpus", str(cpus), "--rwdir", results,
           *[a for opt in KERNEL_CMDLINE for a in ("--append", opt)],
           "--exec", f"bash {shlex.quote(script)}"]
    env = dict(os.environ)
    # vng starts virtme-run from PATH.
    env["PATH"] = f"{VENV}/bin:" + env.get("PATH", "/usr/bin:/bin")
    summary: dict = {"command": cmd, "timeout_s": timeout}
    t0 = time.monotonic()
    log_path = os.path.join(results, "console.log")
    # stdout must be a pipe, not a file: QEMU reopens /proc/self/fd/1 for the guest's stdout and
    # stderr, and two opens of one file would overwrite each other from offset 0.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        assert proc.stdout is not None
        deadline = t0 + timeout
        timed_out = stalled = False
        last_output = time.monotonic()
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            try:
                chunk = proc.stdout.read(65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                log.write(chunk)
                log.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                last_output = time.monotonic()
                continue
            if chunk == b"" and proc.poll() is not None:
                break
            stalled = time.monotonic() - last_output > STALL_S
            if time.monotonic() > deadline or stalled:
                timed_out = not stalled
                os.killpg(proc.pid, signal.SIGKILL)    # our own session: vng and its qemu
                proc.wait()
                break
            time.sleep(0.1)
        rc_vng = proc.wait()
    summary["elapsed_s"] = round(time.monotonic() - t0, 1)
    summary["vng_exit_status"] = rc_vng
    summary["timed_out"] = timed_out
    summary["stalled"] = stalled
    try:
        with open(os.path.join(results, "exit_status"), encoding="utf-8") as f:
            summary["pytest_exit_status"] = int(f.read().strip())
    except (OSError, ValueError):
        summary["pytest_exit_status"] = None
    try:
        with open(os.path.join(results, "guest-info.txt"), encoding="utf-8") as f:
            summary["guest"] = dict(ln.split("=", 1) for ln in f.read().splitlines() if "=" in ln)
    except OSError:
        summary["guest"] = {}
    summary["junit"] = parse_junit(os.path.join(results, "junit.xml"))
    if summary["pytest_exit_status"] is None:
        summary["outcome"] = "incomplete"
    elif summary["pytest_exit_status"] == 0:
        summary["outcome"] = "passed"
    else:
        summary["outcome"] = "failed"
    return summary


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=DEFAULT_RESULTS, help="shared writable directory (emptied)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for boot + tests")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="only report what is missing")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    missing = preflight()
    if missing:
        print("VM tier not set up here; missing: " + "; ".join(missing)
              + ". Run scripts/setup.sh --test.", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if a.check:
        print(f"VM tier ready: kernel {kernel_image()}")
        return EXIT_PASSED
    s = run(os.path.abspath(a.results), a.timeout, a.memory, a.cpus, a.pytest_args)
    j = s["junit"]
    print(f"\nvm-tier: {s['outcome']} in {s['elapsed_s']} s (guest {s['guest'].get('kernel', '?')}): "
          f"{j['passed']} passed, {j['failures'] + j['errors']} failed, {j['skipped']} skipped",
          file=sys.stderr)
    if s["timed_out"]:
        print(f"vm-tier: timed out after {a.timeout} s", file=sys.stderr)
    if s["stalled"]:
        print(f"vm-tier: the guest stalled (no output for {STALL_S} s)", file=sys.stderr)
    if s["attempts"] > 1:
        print(f"vm-tier: {s['attempts']} boots; earlier ones brought no exit status back",
              file=sys.stderr)
    return {"passed": EXIT_PASSED, "failed": EXIT_FAILED}.get(s["outcome"], EXIT_INCOMPLETE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
