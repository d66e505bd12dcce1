"""Thin wrappers over the Linux syscalls the runtime needs and Python's os module lacks.

Each wrapper raises LaunchError naming the syscall (the step), the object and the errno, so a
failure reads like "kill: pidfd_send_signal(9) (EBADF)". The sandbox's own containment (mounts,
namespaces, capabilities) is C (stub/sbx-exec.c); the flag values below are what its inputs
are made of (mounts.compile_root).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from sandboxd.errors import LaunchError

_libc = ctypes.CDLL(None, use_errno=True)

# clone/unshare flags (linux/sched.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = {
    "user": CLONE_NEWUSER, "pid": CLONE_NEWPID, "mnt": CLONE_NEWNS, "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "cgroup": CLONE_NEWCGROUP,
}

# mount flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# prctl options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_close_range = 436
SYS_pidfd_open = 434
SYS_pidfd_send_signal = 424
CLOSE_RANGE_CLOEXEC = 4

_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _fail(step: str, msg: str, path: str | None = None) -> LaunchError:
    e = ctypes.get_errno()
    return LaunchError(msg, step=step, path=path, errno=e)


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0, *, step: str = "prctl") -> int:
    r = _libc.prctl(option, a2, a3, a4, a5)
    if r < 0:
        raise _fail(step, f"prctl({option}, {a2})")
    return r


def set_name(name: bytes) -> None:
    """The thread's name (comm, 15 bytes): what ps, top and perf show for a role of ours."""
    buf = ctypes.create_string_buffer(name[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)   # best effort: a label only


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, step="no_new_privs")


def close_range(first: int, last: int, flags: int = 0) -> None:
    if _libc.syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags)) != 0:
        raise _fail("close_fds", f"close_range({first}, {last})")


def close_fds_except(keep: tuple[int, ...]) -> None:
    """Close every fd >= 3 except those in `keep`."""
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > lo:
            close_range(lo, fd - 1)
        lo = fd + 1
    close_range(lo, 0xFFFFFFFF)


# --- capabilities: capget/capset with the v3 (64-bit) header --------------------------------
def pidfd_open(pid: int) -> int:
    r = _libc.syscall(SYS_pidfd_open, pid, 0)
    if r < 0:
        raise _fail("pidfd_open", f"pidfd_open({pid})")
    return int(r)


def pidfd_send_signal(pidfd: int, sig: int) -> bool:
    """True if sent; False if the process is already gone (ESRCH)."""
    r = _libc.syscall(SYS_pidfd_send_signal, pidfd, sig, None, 0)
    if r < 0:
        if ctypes.get_errno() == 3:
            return False
        raise _fail("kill", f"pidfd_send_signal({sig})")
    return True


def write_file(path: str, data: str | bytes, step: str) -> None:
    """open(O_WRONLY) + one write(): procfs/cgroupfs files want the whole value in one write."""
    b = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b)
        finally:
            os.close(fd)
    except OSError as e:
        raise LaunchError(f"write {b[:80]!r}", step=step, path=path, errno=e.errno) from None
