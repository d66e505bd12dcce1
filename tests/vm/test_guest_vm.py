"""The guest is what the tier promises: Debian's kernel, AppArmor on, pure cgroup v2."""

from __future__ import annotations

import os


def test_apparmor_is_enabled() -> None:
    with open("/sys/module/apparmor/parameters/enabled") as f:
        assert f.read().strip() == "Y"
    assert os.path.isdir("/sys/kernel/security/apparmor/policy")


def test_cgroup_v2_is_pure_with_every_controller() -> None:
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split(" - ", 1)[1].split()[0] for ln in f if " - " in ln]
    assert "cgroup" not in mounts, "a cgroup v1 hierarchy is mounted"
    with open("/sys/fs/cgroup/cgroup.controllers") as f:
        ctrls = set(f.read().split())
    assert {"memory", "pids", "cpu", "cpuset", "io"} <= ctrls
