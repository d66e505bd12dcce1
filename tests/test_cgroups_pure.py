"""cgroups: the pure steps (parse, validate, decide the writes, verify). No root, no kernel."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from sandboxd.errors import HostCapabilityError, PlanError
from sandboxd.plan import Limits
from sandboxd.runtime import cgroups as C

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 master:2 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/with\\040space rw - ext4 /dev/vda1 rw
"""


def test_parse_mountinfo_reads_optional_fields_and_escapes():
    m = C.parse_mountinfo(HYBRID_MOUNTINFO)
    assert [x.mountpoint for x in m] == ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu",
                                        "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified",
                                        "/mnt/with space"]
    assert m[2].fstype == "cgroup" and "memory" in m[2].options   # after "shared:9 master:2"
    assert m[3].fstype == "cgroup2" and m[3].root == "/"


def test_parse_proc_cgroup_splits_comounted_and_v2():
    v1, v2 = C.parse_proc_cgroup("9:name=systemd:/\n4:memory:/process_api/x\n"
                                 "2:cpu,cpuacct:/a:b\n0::/\n")
    assert v1 == {"name=systemd": "/", "memory": "/process_api/x", "cpu": "/a:b",
                  "cpuacct": "/a:b"}
    assert v2 == "/"


@pytest.mark.parametrize("text,cpus", [("0", {0}), ("0-2", {0, 1, 2}), ("0,2-3", {0, 2, 3}),
                                       ("", set()), (" 1\n", {1})])
def test_parse_cpuset(text, cpus):
    assert C.parse_cpuset(text) == cpus


@pytest.mark.parametrize("text", ["a", "0-", "-1", "1-0", "0,,1", "0 1"])
def test_parse_cpuset_rejects(text):
    with pytest.raises(ValueError):
        C.parse_cpuset(text)


@given(st.frozensets(st.integers(0, 200)))
def test_cpuset_format_roundtrip(cpus):
    assert C.parse_cpuset(C._format_cpuset(cpus)) == cpus


def test_plan_v1_order_and_values():
    w = C.plan_v1_writes(Limits(memory_bytes=64 << 20, pids=10, cpu_quota=0.5, cpuset="1"),
                         has_memsw=True, has_swappiness=True, host_swap_bytes=1 << 30,
                         cpuset_cpus=frozenset({0, 1}), cpuset_mems="0")
    assert [(x.controller, x.file, x.value, x.best_effort) for x in w] == [
        ("memory", "memory.limit_in_bytes", str(64 << 20), False),
        ("memory", "memory.memsw.limit_in_bytes", str(64 << 20), False),   # after the limit
        ("memory", "memory.oom_control", "0", False),
        ("memory", "memory.swappiness", "0", True),
        ("pids", "pids.max", "10", False),
        ("cpu", "cpu.cfs_period_us", "100000", False),
        ("cpu", "cpu.cfs_quota_us", "50000", False),
        ("cpuset", "cpuset.mems", "0", False),                              # before cpus
        ("cpuset", "cpuset.cpus", "1", False),
    ]


def test_plan_v1_unlimited_writes_no_limits():
    w = C.plan_v1_writes(Limits(memory_bytes=None, pids=None, cpu_quota=None),
                         has_memsw=True, has_swappiness=False, host_swap_bytes=0)
    assert [x.file for x in w] == ["memory.oom_control"]


def test_plan_v1_joins_the_cpuset_hierarchy_with_every_cpu_when_none_is_asked():
    w = C.plan_v1_writes(Limits(), has_memsw=True, has_swappiness=False, host_swap_bytes=0,
                         cpuset_cpus=frozenset({0, 1, 2}), cpuset_mems="0-1")
    assert [(x.file, x.value) for x in w if x.controller == "cpuset"] == [
        ("cpuset.mems", "0-1"), ("cpuset.cpus", "0-2")]
    with pytest.raises(HostCapabilityError, match="no cgroup v1 cpuset hierarchy"):
        C.plan_v1_writes(Limits(cpuset="0"), has_memsw=True, has_swappiness=False,
                         host_swap_bytes=0)


def test_plan_v1_without_memsw_needs_a_host_without_swap():
    lim = Limits(memory_bytes=64 << 20)
    w = C.plan_v1_writes(lim, has_memsw=False, has_swappiness=False, host_swap_bytes=0)
    assert [x.file for x in w] == ["memory.limit_in_bytes", "memory.oom_control", "pids.max"]
    with pytest.raises(HostCapabilityError) as e:
        C.plan_v1_writes(lim, has_memsw=False, has_swappiness=False, host_swap_bytes=4096)
    assert "swapaccount=1" in str(e.value) and e.value.path == "memory.memsw.limit_in_bytes"


def test_plan_v2_keeps_oom_group_default_and_turns_swap_off():
    w = C.plan_v2_writes(Limits(memory_bytes=1 << 20, pids=5, cpu_quota=2.0),
                         has_swap_max=True, host_swap_bytes=0, has_cpuset=False)
    assert [(x.file, x.value) for x in w] == [
        ("memory.max", str(1 << 20)), ("memory.swap.max", "0"), ("pids.max", "5"),
        ("cpu.max", "200000 100000")]
    assert not any(x.file == "memory.oom.group" for x in w)


def test_plan_v2_cpuset_needs_the_controller_and_the_cpus():
    lim = Limits(cpuset="1")
    with pytest.raises(HostCapabilityError, match="cpuset controller is not enabled"):
        C.plan_v2_writes(lim, has_swap_max=True, host_swap_bytes=0, has_cpuset=False)
    with pytest.raises(HostCapabilityError) as e:
        C.plan_v2_writes(lim, has_swap_max=True, host_swap_bytes=0, has_cpuset=True,
                         cpuset_cpus=frozenset({0}))
    assert str(e.value) == (
        "cgroup_validate: cpuset 1 asks for CPUs 1 that sandboxd's cgroup may not use (it has 0) "
        "[cpuset.cpus.effective]; hint: ask for a subset of those CPUs")


def test_validation_reports_every_problem_at_once():
    with pytest.raises(PlanError) as e:
        C.plan_v2_writes(Limits(memory_bytes=0, pids=0, cpu_quota=0.001, cpuset="x"),
                         has_swap_max=True, host_swap_bytes=0, has_cpuset=True)
    msg = str(e.value)
    assert msg.startswith("cgroup_validate: limits.memory_bytes = 0: want an integer >= 4096")
    for part in ("limits.pids = 0", "limits.cpu_quota = 0.001: below the kernel's minimum",
                 "limits.cpuset: not a CPU list: 'x'"):
        assert part in msg


def test_validation_rejects_bool_and_float_counts():
    with pytest.raises(PlanError, match="limits.pids = True"):
        C.plan_v2_writes(Limits(pids=True), has_swap_max=True, host_swap_bytes=0,
                         has_cpuset=False)
    with pytest.raises(PlanError, match="limits.memory_bytes = 1000000000.0"):
        C.plan_v2_writes(Limits(memory_bytes=1e9), has_swap_max=True, host_swap_bytes=0,
                         has_cpuset=False)


def test_verify_allows_page_rounding_only():
    lim = Limits(memory_bytes=10_000_000, pids=3, cpu_quota=None)
    rb = {"memory_limit_bytes": 10_000_000 // 4096 * 4096, "swap_limit_bytes": 0, "pids_max": 3,
          "cpu_quota_us": None, "cpu_period_us": 100000}
    assert C._verify(lim, rb) == []
    assert C._verify(lim, dict(rb, memory_limit_bytes=10_000_000 - 4096 * 2)) != []
    assert C._verify(lim, dict(rb, swap_limit_bytes=None)) == ["swap limit None (asked 0)"]
    assert C._verify(lim, dict(rb, pids_max=None)) == ["pids.max None (asked 3)"]
    assert C._verify(lim, dict(rb, oom_kill_disable=1)) == ["oom_kill_disable 1 (asked 0)"]
    assert C._verify(lim, dict(rb, memory_oom_group=1))[0].startswith("memory.oom.group 1")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "-x", "x" * 65, "a b", None])
def test_names_that_are_not_path_components_are_refused(name):
    with pytest.raises(PlanError):
        C._check_name(name, "run_id", PlanError)


def test_cgroup_dir_translates_through_the_mount_root():
    m = C.Mount(root="/process_api", mountpoint="/sys/fs/cgroup/memory", fstype="cgroup",
                options=frozenset({"memory"}))
    assert C._cgroup_dir(m, "/process_api/x") == "/sys/fs/cgroup/memory/x"
    assert C._cgroup_dir(m, "/process_api") == "/sys/fs/cgroup/memory"
    assert C._cgroup_dir(m, "/process_apix") is None
    assert C._cgroup_dir(m, "/other") is None
