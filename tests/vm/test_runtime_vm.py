"""Whole sandboxes on the VM's kernel: an AppArmor profile applied by the runtime and enforced
inside a real run, and a memory limit reported as MEMORY_LIMIT from cgroup v2's own files.

The control run (no AppArmor) shows what the same workload gets without the profile, so each
difference is AppArmor's doing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import textwrap

import pytest

from sandboxd import planner
from sandboxd.plan import AppArmorPlan, Bind, Limits, Status
from sandboxd.runtime.client import Runtime

PY = "/usr/bin/python3"
DATA = "/srv/sandboxd-vm-data"       # bound read-only at /data: in the run, outside the judge's paths

WORKLOAD = textwrap.dedent(r"""
    import json, os, socket
    def attempt(f):
        try:
            f()
            return 0
        except OSError as e:
            return e.errno
    out = {
        "read_data": attempt(lambda: open("/data/secret").read()),
        "raw_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()),
        "write_box": attempt(lambda: open("/box/out", "w").write("x")),
        "self": open("/proc/self/attr/current").read().strip(),
    }
    print(json.dumps(out))
""")
ALLOC = "b = b'x' * (256 << 20); print('alive')"


@pytest.fixture(scope="module")
def rt():
    # The launcher's cgroups go below its own cgroup, the guest's root: give its children the
    # controllers (the root cgroup may hold processes and still do so).
    with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids +cpu +cpuset")
    os.makedirs(DATA, exist_ok=True)
    with open(f"{DATA}/secret", "w") as f:
        f.write("secret\n")
    os.chmod(DATA, 0o755)
    os.chmod(f"{DATA}/secret", 0o644)
    r = Runtime()
    yield r
    r.close()
    shutil.rmtree(DATA, ignore_errors=True)


def make_plan(argv, apparmor: AppArmorPlan | None, **lim):
    limits = dataclasses.replace(Limits(wall_time_ms=60_000, cpu_time_ms=30_000), **lim)
    p = planner.build_plan(list(argv), preset="default", limits=limits,
                           binds=(Bind(source=DATA, target="/data"),))
    # Debian 12's kernel has Landlock ABI 2, below what the default plan requires (scoping, ABI
    # 6), and a required Landlock fails closed there. These tests are about AppArmor and
    # cgroup v2, so Landlock is explicitly best effort here.
    p = dataclasses.replace(p, landlock=dataclasses.replace(p.landlock, mode="best_effort"))
    return dataclasses.replace(p, apparmor=apparmor) if apparmor else p


def run_workload(rt, apparmor):
    r = rt.run(make_plan([PY, "-I", "-S", "-c", WORKLOAD], apparmor))
    assert r.status == Status.OK, (r.status, r.stderr)
    return json.loads(r.stdout), r


def test_control_run_without_apparmor(rt):
    out, _ = run_workload(rt, None)
    # Without the profile: /data is readable, and the raw socket fails only for want of
    # CAP_NET_RAW (EPERM).
    assert out == {"read_data": 0, "raw_socket": errno.EPERM, "write_box": 0, "self": "unconfined"}


def test_judge_profile_enforced_in_a_real_run(rt):
    out, _ = run_workload(rt, AppArmorPlan(profile="sandboxd-judge", mode="enforce", required=True))
    # AppArmor's hooks answer first: EACCES for the path outside the judge's list and for the
    # raw socket; the work directory stays writable.
    assert out == {"read_data": errno.EACCES, "raw_socket": errno.EACCES, "write_box": 0,
                   "self": "sandboxd-judge (enforce)"}


def test_judge_profile_in_complain_mode_lets_it_through(rt):
    out, _ = run_workload(rt, AppArmorPlan(profile="sandboxd-judge", mode="complain", required=True))
    # Allowed and logged; the profile's deny rules (raw sockets) still hold.
    assert out == {"read_data": 0, "raw_socket": errno.EACCES, "write_box": 0,
                   "self": "sandboxd-judge.complain (complain)"}


def test_attestation_reads_back_the_confinement(rt):
    _, r = run_workload(rt, AppArmorPlan(profile="sandboxd-judge", required=True))
    att = r.attestation["apparmor"]
    assert att.get("confinement") == "sandboxd-judge (enforce)", att


def test_memory_limit_from_cgroup_v2_under_apparmor(rt):
    r = rt.run(make_plan([PY, "-I", "-S", "-c", ALLOC],
                         AppArmorPlan(profile="sandboxd-judge", required=True),
                         memory_bytes=64 << 20))
    assert r.status == Status.MEMORY_LIMIT and r.oom_kills >= 1, (r.status, r.stderr)
    assert b"alive" not in r.stdout
    assert 48 << 20 <= r.peak_memory_bytes <= 64 << 20
    assert r.attestation["cgroup"]["version"] == 2
    assert r.attestation["cgroup"]["memory_limit_bytes"] == 64 << 20
