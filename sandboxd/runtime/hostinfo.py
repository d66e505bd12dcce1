"""What this host can enforce, probed once at launcher start (and reported by HostInfo)."""

from __future__ import annotations

import os
import pwd
import shutil
from typing import Any

from sandboxd.errors import HostCapabilityError


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def subid_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    text = _read(path) or ""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            return int(parts[1]), int(parts[2])
    return None


UID_BLOCKS_FROM = 2_000_000
UID_BLOCKS = 256
_claimed: list[int] = []   # lock fds, held for the process's life


def claim_uid_block(config: Any) -> tuple[int, int]:
    """A block of host ids no other launcher on this host hands out (flock per block)."""
    import fcntl
    count = config.uid_range_count
    lockdir = os.path.join(os.path.dirname(os.path.abspath(config.root_mountpoint)), "uid-blocks")
    os.makedirs(lockdir, mode=0o700, exist_ok=True)
    starts = [config.uid_range_start] if config.uid_range_start is not None else \
        [UID_BLOCKS_FROM + k * count for k in range(UID_BLOCKS)]
    for start in starts:
        fd = os.open(os.path.join(lockdir, f"{start}-{count}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _claimed.append(fd)
        return start, count
    raise HostCapabilityError("every host uid block is held by another launcher", step="userns",
                              path=lockdir, hint="stop a launcher or configure uid_range_start")


def landlock_abi() -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(444, None, 0, 1)   # landlock_create_ruleset(NULL, 0, VERSION)
    return int(r) if r > 0 else 0


def apparmor_state() -> dict[str, Any]:
    from sandboxd.runtime import apparmor
    return apparmor.host_support()


def probe(config: Any) -> dict[str, Any]:
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    mode = config.id_mapping
    rng: tuple[int, int] | None = None
    if mode == "auto":
        if uid == 0:
            mode = "direct"
        elif shutil.which("newuidmap") and shutil.which("newgidmap") and \
                subid_range("/etc/subuid", user, uid) and subid_range("/etc/subgid", user, uid):
            mode = "newuidmap"
        else:
            mode = "single"
    if mode == "direct":
        if uid != 0:
            raise HostCapabilityError("id_mapping=direct needs root", step="userns")
        rng = claim_uid_block(config)
    elif mode == "newuidmap":
        su = subid_range("/etc/subuid", user, uid)
        sg = subid_range("/etc/subgid", user, uid)
        if not su or not sg:
            raise HostCapabilityError(f"no /etc/subuid or /etc/subgid range for {user}", step="userns",
                                      hint=f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}")
        # uid and gid share one number per run, so use the overlap of both ranges.
        start = max(su[0], sg[0])
        end = min(su[0] + su[1], sg[0] + sg[1])
        if end <= start:
            raise HostCapabilityError("subuid and subgid ranges do not overlap", step="userns")
        rng = (start, end - start)
    max_userns = _read("/proc/sys/user/max_user_namespaces")
    return {
        "kernel": os.uname().release,
        "euid": uid,
        "userns": {"id_mapping": mode, "range": rng,
                   "max_user_namespaces": int(max_userns) if max_userns else None},
        "namespaces": sorted(n for n in ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")
                             if os.path.exists(f"/proc/self/ns/{n}")),
        "seccomp": {"available": os.path.exists("/proc/sys/kernel/seccomp/actions_avail"),
                    "actions": (_read("/proc/sys/kernel/seccomp/actions_avail") or "").split()},
        "landlock": {"abi": landlock_abi()},
        "apparmor": apparmor_state(),
    }
