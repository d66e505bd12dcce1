"""Crash recovery: before serving, remove what a previous instance left behind.

A daemon killed with SIGKILL mid-run leaves work directories (and their tmpfs mounts) under the
state directory, and the runtime's cgroups and processes. On start we take the state directory's
lock (so two daemons never clean up each other's live runs), unmount and delete every leftover
work directory, remove stale private sockets, and ask the runtime to clean its own leftovers
(`Runtime.cleanup_stale()`, when it has one). What was removed is returned for the log.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
from typing import Any

from sandboxd.engine.workdir import _rmtree, mount_points, umount
from sandboxd.errors import SandboxError
from sandboxd.policy.loader import is_within


class StateLock:
    """An flock on <state_dir>/sandboxd.lock held for the life of the daemon."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
        self.path = os.path.join(state_dir, "sandboxd.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN):
                raise SandboxError("another sandboxd is running with this state directory",
                                   step="lock_state_dir", path=state_dir,
                                   hint="stop it first, or give this one another state_dir") from None
            raise SandboxError("cannot lock the state directory", step="lock_state_dir",
                               path=self.path, errno=e.errno) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def recover(state_dir: str) -> list[str]:
    """Remove our own leftovers of a previous instance. Call with the StateLock held."""
    actions: list[str] = []
    work = os.path.join(state_dir, "work")
    # Deepest first, so a parent is unmounted after what is mounted inside it.
    leftovers = sorted((mp for mp in mount_points() if is_within(mp, work) and mp != work),
                       key=lambda p: p.count("/"), reverse=True)
    for mp in leftovers:
        umount(mp)
        actions.append(f"unmounted {mp}")
    if os.path.isdir(work):
        for name in sorted(os.listdir(work)):
            _rmtree(os.path.join(work, name))
            actions.append(f"removed {os.path.join(work, name)}")
    private = os.path.join(state_dir, "private")
    if os.path.isdir(private):
        _rmtree(private)
        actions.append(f"removed {private}")
    return actions


def recover_runtime(runtime: Any) -> list[str]:
    """The runtime's leftovers (cgroups, processes): it removes them itself when it starts and
    reports them in host_info()["cgroups"]["stale_removed"]; `cleanup_stale()` when it has one."""
    actions: list[str] = []
    cleanup = getattr(runtime, "cleanup_stale", None)
    if callable(cleanup):
        r = cleanup()
        if r:
            actions.extend(str(x) for x in (r if isinstance(r, (list, tuple)) else [r]))
    info = runtime.host_info() if hasattr(runtime, "host_info") else {}
    stale = (info.get("cgroups") or {}).get("stale_removed") or []
    actions.extend(f"runtime removed {x}" for x in stale)
    return actions
