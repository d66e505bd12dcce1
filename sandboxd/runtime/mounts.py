"""The sandbox's root filesystem, as the ops init runs to build it (stub/sbx-exec.c, run_op).

Theory of operation. compile_root() turns a FilesystemPlan into a list of ops once per layout,
in the launcher; the run's init (pid 1 of its pid namespace, holding every capability of the
run's user namespace and none of the host's) runs them in C after unshare(CLONE_NEWNS). In order:
  1. every inherited mount made private, so nothing we do propagates to the host and nothing
     the host mounts later appears here;
  2. a small tmpfs at the root mountpoint (a path that exists on the host; the tmpfs exists
     only in this namespace), with the plan's symlinks;
  3. the plan's mounts, parents before children: read-only, nosuid, nodev binds of system
     directories (mount_setattr with AT_RECURSIVE, so submounts are read-only too), tmpfs for
     /tmp, /dev/shm and the work directory (size-capped), writable binds only where the plan
     says;
  4. a minimal /dev from bind-mounted host device nodes (mknod is not possible in a user
     namespace and not wanted), and a fresh /proc for the new pid namespace with OCI's masked
     (bound over by /dev/null or an empty read-only tmpfs) and read-only paths;
  5. small generated files (hosts, passwd, group) on the root tmpfs;
  6. pivot_root(".", ".") and a lazy unmount of the old root: the host's tree is detached and
     unreachable; then the root tmpfs remounted read-only.
Every target is checked here (absolute, normalised, no "..") and created by init without
traversing a symlink (a bound host directory could hold one pointing elsewhere), so a mount can
never land outside the new root.

Ops (their arguments; targets are paths inside the new root, sources host paths):
  mount SRC TGT FSTYPE FLAGS DATA   mount(2) as given, TGT a host path ("" for NULL)
  symlink LINK TGT                  bind SRC TGT BFLAGS (B_WRITABLE, B_OPTIONAL, B_DEVICE)
  tmpfs TGT SIZE MODE NOEXEC        mkdir TGT MODE            proc
  mask TGT    ro TGT                file TGT CONTENT          pivot    rootro
"""

from __future__ import annotations

import os

from sandboxd.errors import PlanError
from sandboxd.plan import FilesystemPlan
from sandboxd.runtime import linux

B_WRITABLE = 1
B_OPTIONAL = 2
B_DEVICE = 4

Op = tuple  # (name, *arguments): str or int arguments, as stubgo.encode_layout writes them


def check_target(path: str) -> None:
    """Targets are absolute, normalised, and never climb out with '..'."""
    if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
        raise PlanError(f"mount target must be an absolute normalised path, got {path!r}",
                        step="filesystem")


def _depth(target: str) -> int:
    return 0 if target == "/" else target.count("/")


def compile_root(fs: FilesystemPlan, root: str) -> list[Op]:
    """The ops that build the new root on a tmpfs at `root` (a host directory, seen only by the
    run's mount namespace: the launcher's configured mountpoint, shared by every run) and pivot
    into it. Raises PlanError for a target that is not absolute and normalised."""
    ops: list[Op] = [
        ("mount", "", "/", "", linux.MS_REC | linux.MS_PRIVATE, ""),                    # 1.
        ("mount", "sandboxd", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=4m,mode=755"),
    ]
    for target, link in fs.symlinks:                                                     # 2.
        check_target(target)
        ops.append(("symlink", link, target))

    # 3. Plan mounts, parents before children (a bind under the work dir needs the work dir).
    order: list[tuple[int, str, object]] = []
    for b in fs.binds:
        check_target(b.target)
        order.append((_depth(b.target), b.target, b))
    for t in fs.tmpfs:
        check_target(t.target)
        order.append((_depth(t.target), t.target, t))
    check_target(fs.work_dir)
    order.append((_depth(fs.work_dir), fs.work_dir, "work"))
    order.append((1, "/dev", "dev"))                 # before /dev/shm and the device nodes
    order.sort(key=lambda o: (o[0], o[1]))
    for _, target, op in order:
        if op == "dev":
            # 4a. /dev: a tmpfs with host device nodes bound in, nothing else.
            ops.append(("tmpfs", "/dev", 64 << 10, "755", 1))
            for node in fs.dev_nodes:
                flags = B_WRITABLE | B_DEVICE | (B_OPTIONAL if node == "tty" else 0)
                ops.append(("bind", "/dev/" + node, "/dev/" + node, flags))
            for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                               ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                               ("ptmx", "pts/ptmx")):
                ops.append(("symlink", link, "/dev/" + name))
        elif op == "work":
            if fs.work_host_path:
                ops.append(("bind", fs.work_host_path, target, B_WRITABLE))
            else:
                ops.append(("tmpfs", target, fs.work_size_bytes, "755", 0))
        elif hasattr(op, "source"):
            ops.append(("bind", op.source, target,
                        (B_WRITABLE if op.writable else 0) | (B_OPTIONAL if op.optional else 0)))
        else:
            ops.append(("tmpfs", target, op.size_bytes, f"{op.mode:o}", 0))

    if not any(t.target == "/dev/shm" for t in fs.tmpfs):
        ops.append(("mkdir", "/dev/shm", 0o1777))
    # 4b. /proc for the new pid namespace, with the sensitive parts masked or read-only.
    if fs.proc:
        ops.append(("proc",))
        ops.extend(("mask", p) for p in fs.proc_masked)
        ops.extend(("ro", p) for p in fs.proc_readonly)
    for target, content in fs.files:                                                     # 5.
        check_target(target)
        if "\0" in content:
            raise PlanError(f"generated file {target} holds a NUL byte", step="filesystem")
        ops.append(("file", target, content))
    ops.append(("pivot",))                                                               # 6.
    if fs.root_readonly:
        ops.append(("rootro",))
    return ops
