"""Build the sandbox's root filesystem inside a fresh mount namespace, then pivot into it.

Theory of operation. The init process of a run (pid 1 of its pid namespace, holding every
capability of the run's user namespace and none of the host's) calls build_root() after
unshare(CLONE_NEWNS). It:
  1. makes every inherited mount private, so nothing we do propagates to the host and nothing
     the host mounts later appears here;
  2. mounts a small tmpfs at the plan's root mountpoint (a path that exists on the host; the
     tmpfs exists only in this namespace) and lays out directories, symlinks and small files;
  3. applies the mounts of the plan, parents before children: read-only, nosuid, nodev binds of
     system directories (mount_setattr with AT_RECURSIVE, so submounts are read-only too),
     tmpfs for /tmp, /dev/shm and the work directory (size-capped), writable binds only where
     the plan says;
  4. builds a minimal /dev from bind-mounted host device nodes (mknod is not possible in a user
     namespace and not wanted), and mounts a fresh /proc for the new pid namespace with OCI's
     masked (bound over by /dev/null or an empty read-only tmpfs) and read-only paths;
  5. pivot_root(".", ".") and a lazy unmount of the old root: the host's tree is detached and
     unreachable; then remounts the root tmpfs read-only.
Every target is created by us and checked not to traverse a symlink (a bound host directory
could hold one pointing elsewhere), so a mount can never land outside the new root.
"""

from __future__ import annotations

import ctypes
import os
import stat

from sandboxd.errors import LaunchError, PlanError
from sandboxd.plan import FilesystemPlan
from sandboxd.runtime import linux

# mount_setattr(2): change attributes of a whole mount tree at once (kernel >= 5.12).
SYS_mount_setattr = 442
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _setattr(path: str, attr_set: int, recursive: bool = True) -> None:
    a = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    r = _libc.syscall(SYS_mount_setattr, -100, path.encode(), flags, ctypes.byref(a), ctypes.sizeof(a))
    if r != 0:
        raise LaunchError("mount_setattr (read-only/nosuid/nodev)", step="mount", path=path,
                          errno=ctypes.get_errno())


def check_target(path: str) -> None:
    """Targets are absolute, normalised, and never climb out with '..'."""
    if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
        raise PlanError(f"mount target must be an absolute normalised path, got {path!r}",
                        step="filesystem")


def _ensure(root: str, target: str, *, is_dir: bool) -> str:
    """Create `target` below `root` (directory or empty file) without following symlinks."""
    full = root + target if target != "/" else root
    parent = root
    parts = [p for p in target.split("/") if p]
    for i, part in enumerate(parts):
        cur = os.path.join(parent, part)
        last = i == len(parts) - 1
        try:
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                raise LaunchError("mount target traverses a symlink", step="mount", path=target)
        except FileNotFoundError:
            try:
                if last and not is_dir:
                    os.close(os.open(cur, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))
                else:
                    os.mkdir(cur, 0o755)
            except OSError as e:
                raise LaunchError("create mountpoint", step="mount", path=target, errno=e.errno) from None
        parent = cur
    return full


def _bind(root: str, source: str, target: str, *, writable: bool, optional: bool,
          device: bool = False) -> None:
    try:
        st = os.stat(source)
    except OSError as e:
        if optional:
            return
        raise LaunchError("bind source missing", step="bind_mount", path=source, errno=e.errno) from None
    full = _ensure(root, target, is_dir=stat.S_ISDIR(st.st_mode))
    linux.mount(source, full, None, linux.MS_BIND | linux.MS_REC)
    attrs = MOUNT_ATTR_NOSUID | (0 if device else MOUNT_ATTR_NODEV) | (0 if writable else MOUNT_ATTR_RDONLY)
    _setattr(full, attrs, recursive=True)


def _tmpfs(root: str, target: str, size: int, mode: int, *, noexec: bool = False) -> None:
    full = _ensure(root, target, is_dir=True)
    flags = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_NOEXEC if noexec else 0)
    linux.mount("tmpfs", full, "tmpfs", flags, f"size={size},mode={mode:o}")


def _depth(target: str) -> int:
    return 0 if target == "/" else target.count("/")


def build_root(fs: FilesystemPlan, root: str) -> None:
    """Build the new root on a tmpfs mounted at `root` (a host directory, seen only by this mount
    namespace: the launcher's configured mountpoint, shared by every run) and pivot into it."""
    # 1. No propagation either way between the host and this namespace.
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    # 2. The new root: a small tmpfs holding only mountpoints, symlinks and generated files.
    linux.mount("sandboxd", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=4m,mode=755")
    for target, link in fs.symlinks:
        check_target(target)
        os.symlink(link, root + target)

    # 3. Plan mounts, parents before children (a bind under the work dir needs the work dir).
    ops: list[tuple[int, str, object]] = []
    for b in fs.binds:
        check_target(b.target)
        ops.append((_depth(b.target), b.target, b))
    for t in fs.tmpfs:
        check_target(t.target)
        ops.append((_depth(t.target), t.target, t))
    check_target(fs.work_dir)
    ops.append((_depth(fs.work_dir), fs.work_dir, "work"))
    ops.append((1, "/dev", "dev"))                 # before /dev/shm and the device nodes
    ops.sort(key=lambda o: (o[0], o[1]))
    for _, target, op in ops:
        if op == "dev":
            # 4a. /dev: a tmpfs with host device nodes bound in, nothing else.
            _tmpfs(root, "/dev", 64 << 10, 0o755, noexec=True)
            for node in fs.dev_nodes:
                _bind(root, "/dev/" + node, "/dev/" + node, writable=True, optional=node == "tty",
                      device=True)
            for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                               ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                               ("ptmx", "pts/ptmx")):
                os.symlink(link, f"{root}/dev/{name}")
        elif op == "work":
            if fs.work_host_path:
                _bind(root, fs.work_host_path, target, writable=True, optional=False)
            else:
                _tmpfs(root, target, fs.work_size_bytes, 0o755)
        elif hasattr(op, "source"):
            _bind(root, op.source, target, writable=op.writable, optional=op.optional)
        else:
            _tmpfs(root, target, op.size_bytes, op.mode)

    if not any(t.target == "/dev/shm" for t in fs.tmpfs):
        os.mkdir(root + "/dev/shm", 0o1777)
    # 4b. /proc for the new pid namespace, with the sensitive parts masked or read-only.
    if fs.proc:
        full = _ensure(root, "/proc", is_dir=True)
        linux.mount("proc", full, "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        for p in fs.proc_masked:
            _mask(root, p)
        for p in fs.proc_readonly:
            path = root + p
            if os.path.exists(path):
                linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
                _setattr(path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)

    # Small generated files (hosts, passwd, group) on the root tmpfs, before it goes read-only.
    for target, content in fs.files:
        check_target(target)
        full = _ensure(root, os.path.dirname(target), is_dir=True) if os.path.dirname(target) != "/" else root
        path = os.path.join(full, os.path.basename(target))
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            os.write(fd, content.encode())
            os.close(fd)
        except OSError as e:
            raise LaunchError("write generated file", step="files", path=target, errno=e.errno) from None

    # 5. Enter the new root; detach the host's tree so no path leads back to it.
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    if fs.root_readonly:
        _setattr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=False)


def _mask(root: str, p: str) -> None:
    path = root + p
    try:
        st = os.lstat(path)
    except OSError:
        return  # not present on this kernel: nothing to hide
    if stat.S_ISDIR(st.st_mode):
        linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                    "size=0")
    else:
        linux.mount(root + "/dev/null", path, None, linux.MS_BIND)
