"""Host-side work directories: files in before a run, files out after it.

Layout under <state_dir>/work (its own mount, in its own shared peer group; see prepare()):

    work/            mode 0711: the run's host uid must traverse it (the runtime binds the box
                     from inside the run's user namespace), nobody may list it
    <id>/            one per run or batch; its own tmpfs capped at the plan's work_size_bytes
                     (so a workload cannot fill the host), mode 0711
    <id>/box/        the run's work directory, bound at /box by the runtime; mode 0700, and the
                     launcher chowns it (not its contents) to the run's host uid, so only that
                     run can enter it, even for a local user who learns the run id
    <id>/shared/     (batch) the program's files, written once, mode 0700
    <id>/case-<n>/   (batch) one case's work directory: hard links to shared/ plus its own files

Files we write are root-owned; the workload sees them through group/other bits only, so shared
files hard-linked into every case cannot be modified by a case (their modes are masked to 0755). Names were checked by
request.check_relative_name; here every open is relative to a directory fd with O_NOFOLLOW, so a
symlink planted by a workload is never followed when we read its outputs. Removal is umount of
the tmpfs (instant, and nothing a workload did can obstruct it), then rmdir.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import shutil
import stat
from dataclasses import dataclass
from typing import Iterable

from sandboxd.errors import LaunchError, SandboxError
from sandboxd.policy.request import InputFile

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE, MS_SHARED = 0x2, 0x4, 0x1000, 0x4000, 1 << 18, 1 << 20
MNT_DETACH = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None, step: str) -> None:
    r = _libc.mount(source.encode() if source else None, target.encode(),
                    fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                    data.encode() if data else None)
    if r != 0:
        e = ctypes.get_errno()
        raise LaunchError(f"mount({fstype or 'bind'}) failed", step=step, path=target, errno=e,
                          hint="work_dir_tmpfs needs root (CAP_SYS_ADMIN); set work_dir_tmpfs: "
                               "false to use plain directories" if e == _errno.EPERM else None)


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (_errno.EINVAL, _errno.ENOENT):   # not a mount point (any more)
            raise LaunchError("umount2 failed", step="work_dir_umount", path=target, errno=e)


def mount_points() -> list[str]:
    """Mount points of this mount namespace, from /proc/self/mountinfo (octal escapes decoded)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split(b" ")[4]
            out.append(mp.decode("unicode_escape") if b"\\" in mp else mp.decode())
    return out


@dataclass(frozen=True)
class OutputFileResult:
    name: str
    content: bytes = b""
    size_bytes: int = 0
    truncated: bool = False
    error: str = ""


class WorkDirs:
    def __init__(self, root: str, use_tmpfs: bool) -> None:
        self.root = root
        self.use_tmpfs = use_tmpfs

    def prepare(self) -> None:
        """Create the root; with tmpfs, make it a mount point in a peer group of its own.

        Why shared, and why before the runtime starts: the launcher keeps spare inits whose
        mount namespace was copied ahead of time (before the run's tmpfs existed). A run's
        tmpfs mounted later reaches those copies only by propagation, so the root must be a
        shared mount when they are copied (they get slave copies: nothing flows back to us).
        Made private first, so the peer group is new and nothing we mount reaches the host's
        other mount namespaces. Each run's init makes its own namespace private before it
        builds its root, so a running sandbox never sees another run's directory."""
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        os.chmod(self.root, 0o711)
        # The runtime binds a run's box from inside the run's user namespace, as the run's host
        # uid: that uid must be able to search every directory on the way.
        d = os.path.dirname(os.path.abspath(self.root))
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                raise SandboxError("a parent of the work directories is not searchable by others",
                                   step="work_root", path=d,
                                   hint="sandboxes reach their work directory as their own uid: "
                                        "chmod o+x it, or choose another state_dir")
            if d == "/":
                break
            d = os.path.dirname(d)
        if self.use_tmpfs:
            if self.root not in mount_points():
                mount(self.root, self.root, None, MS_BIND, None, step="work_root_bind")
            mount("", self.root, None, MS_PRIVATE, None, step="work_root_private")
            mount("", self.root, None, MS_SHARED, None, step="work_root_shared")

    def release(self) -> None:
        """On shutdown: undo prepare() (every run's directory is gone by then)."""
        if self.use_tmpfs and self.root in mount_points():
            umount(self.root)

    def create(self, run_id: str, size_bytes: int) -> "WorkDir":
        top = os.path.join(self.root, run_id)
        os.mkdir(top, 0o700)
        wd = WorkDir(top, mounted=False)
        try:
            if self.use_tmpfs:
                # nr_inodes bounds inode memory as size bounds pages; one inode per 4 KiB is plenty.
                inodes = max(1024, size_bytes // 4096)
                mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV,
                      f"size={size_bytes},nr_inodes={inodes},mode=0711", step="work_dir_mount")
                wd.mounted = True
            else:
                os.chmod(top, 0o711)
        except BaseException:
            wd.close()
            raise
        return wd


class WorkDir:
    def __init__(self, top: str, mounted: bool) -> None:
        self.top = top
        self.mounted = mounted

    def subdir(self, name: str, mode: int = 0o700) -> str:
        p = os.path.join(self.top, name)
        os.mkdir(p)
        os.chmod(p, mode)   # explicit: mkdir's mode is filtered by the umask
        return p

    def remove_subdir(self, name: str) -> None:
        _rmtree(os.path.join(self.top, name))

    def close(self) -> None:
        """Remove everything: umount the tmpfs (or delete the tree), then the directory."""
        if self.mounted:
            umount(self.top)
            self.mounted = False
        _rmtree(self.top)


def write_files(dirpath: str, files: Iterable[InputFile], mode_mask: int = 0o777) -> None:
    """Create each file under dirpath (never following symlinks; names were validated)."""
    root = os.open(dirpath, _DIR_FLAGS)
    try:
        for f in files:
            parts = f.name.split("/")
            fd_dir = _open_dirs(root, parts[:-1], create=True)
            try:
                mode = (f.mode or 0o644) & mode_mask
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=fd_dir)
                try:
                    view = memoryview(f.content)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            finally:
                if fd_dir != root:
                    os.close(fd_dir)
    finally:
        os.close(root)


def link_files(src_dir: str, dst_dir: str, names: Iterable[str]) -> None:
    """Hard-link already written files from src_dir into dst_dir (same file system)."""
    src = os.open(src_dir, _DIR_FLAGS)
    dst = os.open(dst_dir, _DIR_FLAGS)
    try:
        for name in names:
            parts = name.split("/")
            s = _open_dirs(src, parts[:-1], create=False)
            d = _open_dirs(dst, parts[:-1], create=True)
            try:
                os.link(parts[-1], parts[-1], src_dir_fd=s, dst_dir_fd=d, follow_symlinks=False)
            finally:
                for fd in (s, d):
                    if fd not in (src, dst):
                        os.close(fd)
    finally:
        os.close(src)
        os.close(dst)


def read_output(dirpath: str, name: str, max_bytes: int) -> OutputFileResult:
    """Read one output file written by the workload, refusing symlinks and non-regular files."""
    parts = name.split("/")
    try:
        root = os.open(dirpath, _DIR_FLAGS)
    except OSError as e:
        return OutputFileResult(name, error=f"work directory unreadable: {e.strerror}")
    fd_dir = root
    try:
        try:
            fd_dir = _open_dirs(root, parts[:-1], create=False)
        except OSError as e:
            return OutputFileResult(name, error=_why(e))
        try:
            # O_NONBLOCK: a FIFO planted by the workload must not block us.
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=fd_dir)
        except OSError as e:
            return OutputFileResult(name, error=_why(e))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return OutputFileResult(name, error="not a regular file")
            chunks = []
            left = max_bytes
            while left > 0:
                b = os.read(fd, min(left, 1 << 20))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
            data = b"".join(chunks)
            size = max(st.st_size, len(data))
            return OutputFileResult(name, data, size, truncated=size > len(data))
        finally:
            os.close(fd)
    finally:
        if fd_dir != root:
            os.close(fd_dir)
        os.close(root)


def _why(e: OSError) -> str:
    if e.errno == _errno.ENOENT:
        return "missing"
    if e.errno == _errno.ELOOP:
        return "symlink (not followed)"
    if e.errno == _errno.ENOTDIR:
        return "a parent is a symlink or not a directory (not followed)"
    return e.strerror or str(e)


def _open_dirs(root: int, parts: list[str], create: bool) -> int:
    """Walk `parts` below the directory fd `root` without following symlinks; returns a dir fd."""
    fd = root
    for p in parts:
        made = False
        if create:
            try:
                os.mkdir(p, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
        try:
            nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
        finally:
            if fd != root:
                os.close(fd)
        fd = nfd
        if made:
            # Writable by the run (the box around it admits only the run's uid); sticky keeps
            # the run from removing the files we put there.
            os.fchmod(fd, 0o1777)
    return fd


def _rmtree(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)   # does not follow symlinks inside the tree
    else:
        os.unlink(path)
