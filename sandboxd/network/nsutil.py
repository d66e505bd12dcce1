"""Network-namespace syscalls the launcher needs, as thin wrappers that name the syscall.

Theory of operation: the launcher is single-threaded, so it can step into another network
namespace with setns(2), do one thing that binds to "the current namespace" (create a netlink
socket, open a /proc/sys/net file, start `nft`), and step back. A socket keeps the namespace
it was created in for its whole life, so after stepping back we still talk to that namespace.
We never fork a helper for this (pyroute2's `netns=` arguments do: see docs/network.md).

Python 3.11 has no os.setns/os.unshare, hence ctypes. Every failure is a LaunchError naming the
syscall and the path; failing to step *back* is fatal for the launcher, because it would go on
running in the wrong namespace, so that case raises with a hint saying so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import fcntl
import os
import stat
from typing import Iterator

from sandboxd.errors import LaunchError

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
# ioctl(NS_GET_NSTYPE) = _IO(0xb7, 0x3): returns the CLONE_NEW* type of a namespace fd.
NS_GET_NSTYPE = 0xB703

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _fail(call: str, path: str | None, hint: str | None = None) -> LaunchError:
    e = ctypes.get_errno()
    return LaunchError(f"{call} failed", step=f"network.{call}", path=path, errno=e, hint=hint)


def open_netns(path: str) -> int:
    """Open a network-namespace file (/proc/PID/ns/net or a bind mount of one), verified."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError("cannot open network namespace", step="network.open_netns", path=path,
                          errno=e.errno) from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        os.close(fd)
        raise LaunchError("not a namespace file", step="network.open_netns", path=path,
                          errno=e.errno) from None
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise LaunchError("not a network namespace", step="network.open_netns", path=path,
                          hint="pass /proc/<pid>/ns/net of the sandbox's first process")
    return fd


def ns_id(fd: int) -> tuple[int, int]:
    """Identity of a namespace: (device, inode) of its nsfs file; equal ids are the same ns."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def setns(fd: int, path: str | None = None) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise _fail("setns", path)


@contextlib.contextmanager
def entered(target_fd: int, home_fd: int, path: str | None = None) -> Iterator[None]:
    """Run the block in the namespace `target_fd`, then return to `home_fd` whatever happens."""
    setns(target_fd, path)
    try:
        yield
    finally:
        if _libc.setns(home_fd, CLONE_NEWNET) != 0:
            # Continuing would run the launcher's next steps in a sandbox's namespace.
            raise _fail("setns", "/proc/self/ns/net",
                        hint="could not return to the launcher's own network namespace; "
                             "the launcher must exit")


def create_named_netns(path: str, home_fd: int) -> int:
    """Create a new network namespace pinned at `path` (a bind mount, like `ip netns add`).

    Returns an fd for it. The launcher unshares its own network namespace for a moment,
    bind-mounts it, and steps back to `home_fd`: no helper process.
    """
    flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags, 0o444))
    except OSError as e:
        raise LaunchError("cannot create the namespace mount point", step="network.create_netns",
                          path=path, errno=e.errno,
                          hint=("a leftover from a crash? NetworkManager.cleanup_stale() removes it"
                                if e.errno == _errno.EEXIST else None)) from None
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _fail("unshare", path)
        try:
            src = b"/proc/thread-self/ns/net"
            if _libc.mount(src, path.encode(), None, MS_BIND, None) != 0:
                raise _fail("mount", path)
            fd = open_netns(path)
        finally:
            if _libc.setns(home_fd, CLONE_NEWNET) != 0:
                raise _fail("setns", "/proc/self/ns/net",
                            hint="could not return to the launcher's own network namespace; "
                                 "the launcher must exit")
    except BaseException:
        remove_named_netns(path, missing_ok=True)
        raise
    return fd


def is_nsfs_mount(path: str) -> bool:
    """True when `path` is a mounted namespace file (the nsfs ioctl answers on it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, NS_GET_NSTYPE)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_named_netns(path: str, missing_ok: bool = False) -> None:
    """Unmount and unlink a pinned namespace; the kernel frees it once nothing else holds it."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise LaunchError("no such namespace", step="network.remove_netns", path=path,
                          errno=_errno.ENOENT) from None
    if is_nsfs_mount(path):
        # MNT_DETACH: an `nsenter`/`ip netns exec` still inside must not make cleanup fail.
        if _libc.umount2(path.encode(), MNT_DETACH) != 0:
            e = ctypes.get_errno()
            if e not in (_errno.EINVAL, _errno.ENOENT):  # EINVAL: not a mount point any more
                raise LaunchError("umount failed", step="network.umount", path=path, errno=e)
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise LaunchError("cannot remove the namespace mount point", step="network.remove_netns",
                          path=path, errno=e.errno) from None


def write_sysctl(name: str, value: str, missing_ok: bool = False) -> None:
    """Write /proc/sys/<name> ("net/ipv4/ip_forward") of the *current* network namespace.

    Call it inside `entered`: /proc/sys/net resolves to the namespace of the writer.
    """
    path = "/proc/sys/" + name
    if missing_ok and not os.path.exists(path):
        return
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise LaunchError("sysctl write failed", step="network.sysctl", path=path,
                          errno=e.errno) from None
