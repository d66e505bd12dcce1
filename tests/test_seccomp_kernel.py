"""Seccomp on the real kernel: a forked child sets no_new_privs, installs a compiled filter and
probes syscalls the way bubblewrap's try-syscall does.

A probe passes bad arguments, so an allowed syscall fails with its own error (EBADF, EFAULT,
EINVAL) and a filtered one with the profile's errno; test profiles use errnos no syscall returns
by itself (1337, 2001, ...) to prove the filter answered. Each denial has a control: the same
probe unfiltered, or the evaluator's prediction, so a test fails if the filter stops denying.

The child hands its listener fd to the parent over a socket at SYNC (the sendmsg exception the
compiler adds), exactly like the launcher's workload does; the parent plays the supervisor.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from sandboxd.errors import LaunchError
from sandboxd.runtime import seccomp as sc
from sandboxd.runtime import syscalls

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles" / "seccomp"
NR = syscalls.libseccomp_number
SYNC = 200                 # the child's sync socket sits here; compiled filters name it
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

if not os.path.exists("/proc/sys/kernel/seccomp/actions_avail"):
    pytestmark = pytest.mark.skip(reason="host lacks: seccomp filter mode (CONFIG_SECCOMP_FILTER)")


def raw(nr: int, *args: int) -> int:
    """syscall(nr, args...) -> result, or -errno."""
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a & (2**64 - 1)) for a in args])
    return -ctypes.get_errno() if r == -1 else int(r)


def set_nnp() -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


# Enough for the Python child between install and its last write: memory, signals, futexes,
# writing the result, exiting; plus execve for the program tests.
HARNESS_ALLOW = ["read", "write", "close", "mmap", "munmap", "brk", "mprotect", "madvise", "mremap",
                 "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "futex", "exit", "exit_group",
                 "getpid", "gettid", "fstat", "newfstatat", "lseek", "fcntl", "ioctl", "sigaltstack",
                 "getrandom", "clock_gettime", "wait4", "execve"]


def profile(default: str = "SCMP_ACT_ERRNO", errno_ret: int | None = 1337, extra: list | None = None,
            allow: list[str] | None = None) -> sc.Profile:
    doc: dict[str, Any] = {"defaultAction": default, "syscalls": [
        {"names": allow if allow is not None else HARNESS_ALLOW, "action": "SCMP_ACT_ALLOW"}] + (extra or [])}
    if errno_ret is not None:
        doc["defaultErrnoRet"] = errno_ret
    return sc.load_profile_text(json.dumps(doc), "probe.json")


@dataclass
class Outcome:
    status: int
    result: Any
    stdout: bytes
    notes: list[tuple[int, str, int]] = field(default_factory=list)   # (nr, name, arch)
    listener: int = -1

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def denied(self) -> list[str]:
        return [n for _, n, _ in self.notes]


def run_filtered(compiled: sc.CompiledFilter | None, probe: Callable[[], Any], *, timeout: float = 60.0,
                 supervise: bool = True, before: Callable[[Outcome], None] | None = None) -> Outcome:
    """Fork; in the child set no_new_privs, install `compiled` (None: no filter), hand the
    listener over, run `probe` and write its JSON result. The parent plays the supervisor:
    it applies compiled.action_for() to every notification (kill: SIGKILL the child), unless
    `supervise` is off and `before` answers by hand."""
    prepared = sc.prepare_install(compiled) if compiled is not None else None
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(child_sock.fileno(), SYNC, inheritable=False)
            sync = socket.socket(fileno=SYNC)
            os.dup2(out_w, 1)
            set_nnp()
            listener = sc.install_filter(prepared) if prepared is not None else -1
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener]))] if listener >= 0 else []
            sync.sendmsg([b"L"], anc)
            out = json.dumps({"ok": probe()}).encode()
            os.write(res_w, out)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            try:
                os.write(res_w, json.dumps({"error": traceback.format_exc()}).encode())
            finally:
                os._exit(3)
    child_sock.close()
    os.close(res_w)
    os.close(out_w)
    outcome = Outcome(status=0, result=None, stdout=b"")
    stop = threading.Event()
    sup: threading.Thread | None = None
    try:
        parent_sock.settimeout(timeout)
        try:
            msg, anc, _, _ = parent_sock.recvmsg(16, socket.CMSG_SPACE(4))
        except socket.timeout:
            msg, anc = b"", []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                outcome.listener = array.array("i", data[:4])[0]
        if outcome.listener >= 0 and supervise:
            assert compiled is not None
            sup = threading.Thread(target=_supervise, args=(compiled, outcome, pid, stop), daemon=True)
            sup.start()
        if before is not None:
            before(outcome)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            r, _, _ = select.select([out_r], [], [], 0.05)
            if r:
                b = os.read(out_r, 65536)
                if b:
                    chunks.append(b)
            if wpid:
                outcome.status = status
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"filtered child hung; notifications so far: {outcome.notes}")
        while b := os.read(out_r, 65536):
            chunks.append(b)
        outcome.stdout = b"".join(chunks)
        data = b""
        while b := os.read(res_r, 65536):
            data += b
        if data:
            d = json.loads(data)
            if "error" in d:
                pytest.fail("child raised:\n" + d["error"])
            outcome.result = d["ok"]
    finally:
        stop.set()
        if sup is not None:
            sup.join(5)
        if outcome.listener >= 0:
            os.close(outcome.listener)
        parent_sock.close()
        os.close(res_r)
        os.close(out_r)
    return outcome


def _supervise(compiled: sc.CompiledFilter, outcome: Outcome, pid: int, stop: threading.Event) -> None:
    fd = outcome.listener
    p = select.poll()
    p.register(fd, select.POLLIN)
    while not stop.is_set():
        ev = p.poll(50)
        if not ev:
            continue
        if ev[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return
        try:
            n = sc.recv_notification(fd)
        except OSError:
            continue
        outcome.notes.append((n.nr, sc.syscall_name(n.nr, n.arch), n.arch))
        action, value = compiled.action_for(n.nr)
        if action == "kill":
            os.kill(pid, signal.SIGKILL)
            sc.respond(fd, n.id, error=errno.EPERM)
        else:
            sc.respond(fd, n.id, error=value)


# --- install and the default action -------------------------------------------------------------

def test_errno_default_and_explicit_errno_rule():
    c = sc.compile_profile(profile(extra=[{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 2001}]),
                           report_denials=False, sync_fd=SYNC)
    assert not c.uses_notify

    def probe():
        return {"getppid": raw(NR("getppid")), "getcwd": raw(NR("getcwd"), 0, 0),
                "read": raw(NR("read"), 2**31 - 1, 0, 0), "uname": raw(NR("uname"), 0)}

    control = run_filtered(None, probe).result
    assert control["getppid"] > 0 and control["getcwd"] != -2001 and control["uname"] == -errno.EFAULT
    o = run_filtered(c, probe)
    assert o.exit_code == 0 and o.notes == []
    assert o.result == {"getppid": -1337, "getcwd": -2001, "read": -errno.EBADF, "uname": -1337}
    # the evaluator predicts what the kernel did
    assert sc.ret_action(sc.evaluate(c.bpf, NR("getppid"))) == ("errno", 1337)


def test_kill_process_default_dies_with_sigsys_without_notify():
    c = sc.compile_profile(profile("SCMP_ACT_KILL_PROCESS", errno_ret=None), report_denials=False, sync_fd=SYNC)
    assert not c.uses_notify and c.actions_by_nr == {}

    def probe():
        os.write(1, b"before\n")
        raw(NR("getppid"))
        os.write(1, b"after\n")
        return "survived"

    o = run_filtered(c, probe)
    assert o.listener == -1 and o.notes == []
    assert o.signal == signal.SIGSYS and o.stdout == b"before\n" and o.result is None


def test_install_needs_no_new_privs():
    c = sc.compile_profile(profile(), report_denials=False)
    prepared = sc.prepare_install(c)

    def probe():
        if os.geteuid() == 0:
            os.setresuid(65534, 65534, 65534)   # root could install without it (CAP_SYS_ADMIN)
        try:
            sc.install_filter(prepared)
        except LaunchError as e:
            return {"step": e.step, "errno": e.errno, "hint": e.hint}
        return None

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # no set_nnp() here, on purpose
        os.close(r)
        try:
            os.write(w, json.dumps(probe()).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 65536)
    os.close(r)
    os.waitpid(pid, 0)
    assert json.loads(data) == {"step": "seccomp", "errno": errno.EACCES,
                                "hint": "set no_new_privs before seccomp (prctl PR_SET_NO_NEW_PRIVS)"}


# --- denial reporting through the listener ------------------------------------------------------

def test_report_denials_errno_answered_by_supervisor():
    c = sc.compile_profile(profile(extra=[{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]),
                           report_denials=True, sync_fd=SYNC)
    assert c.uses_notify and c.actions_by_nr == {-1: ("errno", 1337)}
    assert c.install_flags & sc.SECCOMP_FILTER_FLAG_NEW_LISTENER

    def probe():
        return {"getppid": raw(NR("getppid")), "clone3": raw(NR("clone3"), 0, 0),
                "read": raw(NR("read"), 2**31 - 1, 0, 0)}

    o = run_filtered(c, probe)
    assert o.listener >= 0 and o.exit_code == 0
    assert o.result == {"getppid": -1337, "clone3": -errno.ENOSYS, "read": -errno.EBADF}
    # only the default-denied syscall was notified; the explicit errno shim was not
    assert o.notes == [(NR("getppid"), "getppid", syscalls.AUDIT_ARCH_X86_64)]


def test_report_denials_kill_and_id_valid():
    c = sc.compile_profile(profile("SCMP_ACT_KILL_PROCESS", errno_ret=None), report_denials=True, sync_fd=SYNC)
    assert c.actions_by_nr == {-1: ("kill", 0)}
    seen: dict[str, Any] = {}

    def probe():
        os.write(1, b"before\n")
        raw(NR("getppid"), 11, 22)
        os.write(1, b"after\n")
        return "survived"

    # Answer by hand here (no supervisor thread): check the notification, id_valid, then kill.
    def by_hand(o: Outcome) -> None:
        fd = o.listener
        r, _, _ = select.select([fd], [], [], 30)
        assert r, "no notification arrived"
        n = sc.recv_notification(fd)
        seen.update(nr=n.nr, args=n.args[:2], arch=n.arch, pid=n.pid,
                    valid=sc.id_valid(fd, n.id), sizes=sc.notif_sizes())
        os.kill(n.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while sc.id_valid(fd, n.id) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["valid_after_kill"] = sc.id_valid(fd, n.id)
        seen["respond_after_kill"] = sc.respond(fd, n.id, error=errno.EPERM)

    o = run_filtered(c, probe, supervise=False, before=by_hand)
    assert seen["nr"] == NR("getppid") and sc.syscall_name(seen["nr"]) == "getppid"
    assert seen["args"] == (11, 22) and seen["arch"] == syscalls.AUDIT_ARCH_X86_64
    assert seen["valid"] is True and seen["valid_after_kill"] is False and seen["respond_after_kill"] is False
    assert seen["sizes"][0] >= 80 and seen["sizes"][1] >= 24 and seen["sizes"][2] >= 64
    assert o.signal == signal.SIGKILL and o.stdout == b"before\n"


# --- the shipped profiles -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "judge"])
def test_clone3_enosys_and_namespaced_clone_denied_while_fork_works(name):
    c = sc.compile_profile(sc.load_profile(str(PROFILES / f"{name}.json")), report_denials=True, sync_fd=SYNC)

    def probe():
        out = {"clone3": raw(NR("clone3"), 0, 0)}
        pid = os.fork()                          # glibc fork: clone without namespace flags
        if pid == 0:
            os._exit(7)
        out["fork_status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        r = raw(NR("clone"), CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)                          # unfiltered control: the new process just leaves
        if r > 0:
            os.waitpid(r, 0)
        out["clone_newuser"] = r
        return out

    control = run_filtered(None, probe).result
    assert control["clone3"] == -errno.EINVAL and control["clone_newuser"] > 0
    o = run_filtered(c, probe)
    if name == "default":
        assert o.result == {"clone3": -errno.ENOSYS, "fork_status": 7, "clone_newuser": -errno.EPERM}
        assert o.denied == ["clone"]             # reported, answered with the default's EPERM
    else:
        assert o.signal == signal.SIGKILL and o.denied == ["clone"]   # judge: the run is killed
        assert o.result is None


def test_default_profile_socket_families():
    c = sc.compile_profile(sc.load_profile(str(PROFILES / "default.json")), report_denials=False, sync_fd=SYNC)

    def probe():
        out = {}
        for label, fam, typ, proto in [("unix", 1, socket.SOCK_STREAM, 0), ("inet", 2, socket.SOCK_DGRAM, 0),
                                       ("vsock", 40, socket.SOCK_STREAM, 0), ("alg", 38, socket.SOCK_SEQPACKET, 0),
                                       ("packet", 17, socket.SOCK_RAW, 0), ("netlink_route", 16, socket.SOCK_RAW, 0),
                                       ("netlink_netfilter", 16, socket.SOCK_RAW, 12),
                                       ("vsock_high_bits", (1 << 32) | 40, socket.SOCK_STREAM, 0)]:
            r = raw(NR("socket"), fam, typ, proto)
            if r >= 0:
                os.close(r)
                r = 0
            out[label] = r
        return out

    control = run_filtered(None, probe).result
    assert control["unix"] == 0 and control["alg"] != -errno.EPERM   # root could open these unfiltered
    o = run_filtered(c, probe)
    assert o.result == {"unix": 0, "inet": 0, "vsock": -errno.EPERM, "alg": -errno.EPERM,
                        "packet": -errno.EPERM, "netlink_route": 0, "netlink_netfilter": -errno.EPERM,
                        "vsock_high_bits": -errno.EPERM}


def test_x32_syscall_killed():
    c = sc.compile_profile(sc.load_profile(str(PROFILES / "default.json")), report_denials=True, sync_fd=SYNC)

    def probe():
        os.write(1, b"before\n")
        return raw(syscalls.X32_SYSCALL_BIT | NR("getpid"))

    assert run_filtered(None, probe).result == -errno.ENOSYS     # unfiltered: no x32 ABI here
    o = run_filtered(c, probe)
    assert o.signal == signal.SIGSYS and o.stdout == b"before\n" and o.notes == []


# --- programs under the shipped profiles --------------------------------------------------------

INT80_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("native getpid ok %d\n", (int)getpid());
    fflush(stdout);
    long r;
    /* i386 getpid (20) through the 32-bit entry point */
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(20L) : "memory", "r8", "r9", "r10", "r11");
    printf("int80 returned %ld\n", r);
    return 0;
}
"""

HELLO_C = r"""
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    char *p = malloc(1 << 20);
    p[0] = 'x';
    printf("hello from C %c\n", p[0]);
    return 0;
}
"""

HELLO_CPP = r"""
#include <iostream>
#include <string>
#include <thread>
#include <vector>
int main() {
    std::vector<int> v(1000, 1);
    long sum = 0;
    std::thread t([&] { for (int x : v) sum += x; });
    t.join();
    std::cout << "hello from C++ " << sum << std::endl;
    return 0;
}
"""


def _build(tmp_path: Path, name: str, source: str, compiler: str, *flags: str) -> str:
    if shutil.which(compiler) is None:
        pytest.skip(f"host lacks: {compiler} (scripts/setup.sh installs it)")
    src = tmp_path / name
    src.write_text(source)
    exe = tmp_path / name.split(".")[0]
    subprocess.run([compiler, "-O1", "-o", str(exe), str(src), *flags], check=True, capture_output=True)
    return str(exe)


def _exec(argv: list[str]) -> Callable[[], Any]:
    def probe():
        os.execv(argv[0], argv)
    return probe


@pytest.mark.parametrize("name", ["default", "judge"])
def test_i386_int80_killed(tmp_path, name):
    exe = _build(tmp_path, "int80.c", INT80_C, "gcc")
    control = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    assert "int80 returned" in control and "-38" not in control   # the i386 ABI works unfiltered
    c = sc.compile_profile(sc.load_profile(str(PROFILES / f"{name}.json")), report_denials=True, sync_fd=SYNC)
    o = run_filtered(c, _exec([exe]))
    assert o.stdout.startswith(b"native getpid ok") and b"int80" not in o.stdout
    assert o.signal == signal.SIGSYS and o.notes == []        # killed by the BPF itself, not reported


@pytest.mark.parametrize("name", ["default", "judge"])
def test_programs_run_under_profile(tmp_path, name):
    c = sc.compile_profile(sc.load_profile(str(PROFILES / f"{name}.json")), report_denials=True, sync_fd=SYNC)
    hello = _build(tmp_path, "hello.c", HELLO_C, "gcc")
    hello_static = _build(tmp_path, "hello_static.c", HELLO_C, "gcc", "-static")
    hellocc = _build(tmp_path, "hellocc.cpp", HELLO_CPP, "g++", "-pthread")
    (tmp_path / "data.txt").write_text("b\na\nc\n")
    cases = [
        (["/bin/true"], b""),
        (["/bin/sh", "-c", "echo sh ok; x=$(echo sub); echo $x | cat"], b"sh ok\nsub\n"),
        (["/bin/sh", "-c", f"sort {tmp_path}/data.txt | head -n 2; ls -l {tmp_path}/data.txt | wc -l; "
                           f"cp {tmp_path}/data.txt {tmp_path}/copy.txt && cat {tmp_path}/copy.txt | wc -c; "
                           "id -u >/dev/null && date +%Y >/dev/null && echo done"],
         b"a\nb\n1\n6\ndone\n"),
        (["/usr/bin/python3", "-c", "import json, os, sys, subprocess, threading; "
                                    "t = threading.Thread(target=lambda: None); t.start(); t.join(); "
                                    "print(json.dumps({'py': sys.version_info[0], 'sub': "
                                    "subprocess.run(['/bin/echo', 'x'], capture_output=True).stdout.decode()}))"],
         b'{"py": 3, "sub": "x\\n"}\n'),
        ([hello], b"hello from C x\n"),
        ([hello_static], b"hello from C x\n"),
        ([hellocc], b"hello from C++ 1000\n"),
    ]
    for argv, want in cases:
        o = run_filtered(c, _exec(argv))
        assert o.denied == [], f"{name}.json denied {o.denied} to {argv}"
        assert o.exit_code == 0, f"{argv}: status {o.status:#x}, stdout {o.stdout!r}"
        assert o.stdout == want, argv


@pytest.mark.parametrize("caps_keep", [(), ("CAP_SYS_PTRACE",)])
def test_evaluator_agrees_with_kernel(caps_keep):
    """The cBPF interpreter the unit tests rely on predicts the kernel's answers, including the
    rules includes/excludes switch by capability (ptrace: errno 2003 without, allowed with)."""
    p = sc.load_profile(str(Path(__file__).resolve().parent / "seccomp_data" / "everything.json"))
    c = sc.compile_profile(p, caps_keep=caps_keep, report_denials=False, sync_fd=SYNC)
    probes = [("getcwd", (0, 0)), ("uname", (0,)), ("getpid", ()), ("fcntl", (2**31 - 1, 1033)),
              ("fcntl", (2**31 - 1, 1)), ("personality", (0xFFFFFFFF,)), ("personality", (9,)),
              ("ptrace", (2, 0, 0, 0)), ("membarrier", (0, 0)), ("bpf", (0, 0, 0)), ("gettid", ()),
              ("getpgrp", ())]

    def probe():
        return [raw(NR(n), *a) for n, a in probes]

    got = run_filtered(c, probe).result
    ptrace = got[[n for n, _ in probes].index("ptrace")]
    assert ptrace == (-errno.ESRCH if caps_keep else -2003)    # PTRACE_PEEKDATA on pid 0
    for (name, args), r in zip(probes, got):
        action, data = sc.ret_action(sc.evaluate(c.bpf, NR(name), args))
        if action == "errno":
            assert r == -data, (name, args, r)
        elif action == "trace":
            assert r == -errno.ENOSYS, (name, args, r)        # no tracer attached
        else:
            assert action in ("allow", "log") and r != -1234 and r not in (-2001, -2002, -2003), (name, args, r)
