"""Configuration of the runtime (the launcher process), set by the operator, not by requests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RuntimeConfig:
    # Host uids/gids handed out one per concurrent run when the launcher runs as root.
    # None: the launcher claims the first free block of `uid_range_count` ids from 2,000,000 up
    # (far above ordinary users and Debian's subuid ranges), holding a lock per block so two
    # launchers on one host never hand out the same id. A configured start is locked the same way.
    uid_range_start: int | None = None
    uid_range_count: int = 65_536
    # Where sandboxd's cgroups go. None: below the cgroup the launcher itself is in (per
    # controller on v1), as a delegated service does.
    cgroup_root: str | None = None
    # Names sandboxd's own cgroups (sandboxd-<instance>) so a restart finds and removes only
    # its own leftovers.
    instance: str = "default"
    # Host directory every run mounts its new root's tmpfs on, inside its own mount namespace.
    root_mountpoint: str = "/run/sandboxd/root"
    # How uid/gid maps are written: "auto" (root: write directly; otherwise newuidmap with a
    # /etc/subuid range when available, else a single-id map of our own uid), or force one.
    id_mapping: str = "auto"
    # Spares built ahead of time for the most recent layouts (a layout: the plan without
    # argv, env, limits and stdin): user and pid namespace, init placed in its cgroup, the
    # root built, the workload staged in the exec stub, so a run only sends its GO frame.
    # One generic spare (namespaces only) is kept besides, for a run of a new layout.
    # 0 disables all of them. Each spare is three idle processes and a small tmpfs.
    prefork: int = 2
    # Keep a run's start off the launcher's CPU: the launcher stays on one CPU of its set and a
    # staged stub waits with that CPU left out of its affinity (restored as soon as it wakes,
    # before anything of the run). Without it, a wakeup lands on the waker's CPU (on this VM
    # always: an idle vCPU counts as preempted), so the stub would run where the launcher still
    # has START to send. No effect with a single allowed CPU.
    spread_cpus: bool = True
    # The exec stub (sbx-exec, built by scripts/build_stub.sh). None: the one in the package.
    exec_stub: str | None = None
    # Network segments (sandboxd.network.config.parse_network_config's mapping: segments,
    # uplink, ...). None: only "none" and "host" modes exist on this launcher.
    network: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RuntimeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            raise ValueError(f"RuntimeConfig: unknown keys {sorted(extra)}")
        return cls(**d)
