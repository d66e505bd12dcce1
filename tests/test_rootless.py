"""The runtime started by an unprivileged user: single-id map and newuidmap with subuid ranges.

Set-up (as root, undone afterwards): a system user, /etc/subuid and /etc/subgid ranges for it,
and a delegated cgroup subtree (the instance cgroup `sandboxd-<instance>` made by root below the
test's own cgroup in each hierarchy and chowned to the user, as a delegating service manager
does). The runtime itself then runs as that user, with no privilege at all.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, need_root

USER = "sandboxd-rootless"
SUB_START, SUB_COUNT = 3_000_000, 65_536
INSTANCE = "rootless-test"

SCRIPT = textwrap.dedent("""
    import dataclasses, json, os, sys
    sys.path.insert(0, {root!r})
    from sandboxd import planner
    from sandboxd.plan import Limits
    from sandboxd.runtime.client import Runtime
    from sandboxd.runtime.config import RuntimeConfig
    mode = sys.argv[1]
    cfg = RuntimeConfig(instance={instance!r}, id_mapping=mode, root_mountpoint={mnt!r}, prefork=1)
    out = {{}}
    with Runtime(cfg) as rt:
        out["host"] = rt.host_info()["userns"]
        p = planner.build_plan(["/bin/sh", "-c", "id -u; cat /proc/self/uid_map; echo x > /box/f && echo ok"],
                               limits=Limits(wall_time_ms=10000, memory_bytes=64 << 20))
        if mode == "single":
            p = dataclasses.replace(p, user=dataclasses.replace(p.user, uid_mode="single", allow_single_uid=True))
        r = rt.run(p)
        out["status"] = r.status.value
        out["stdout"] = r.stdout.decode()
        out["att"] = {{k: r.attestation[k] for k in ("uid_map", "capabilities", "no_new_privs", "namespaces")}}
        out["seccomp_mode"] = r.attestation["seccomp"]["mode"]
        big = planner.build_plan(["/usr/bin/python3", "-c", "b=bytearray(256<<20); [b.__setitem__(i,1) for i in range(0,len(b),4096)]"],
                                 limits=Limits(wall_time_ms=10000, memory_bytes=32 << 20))
        if mode == "single":
            big = dataclasses.replace(big, user=dataclasses.replace(big.user, uid_mode="single", allow_single_uid=True))
        out["oom_status"] = rt.run(big).status.value
    print(json.dumps(out))
""")


def _own_cgroup_dirs() -> list[str]:
    """<mount>/<our cgroup>/sandboxd-<instance> for each v1 hierarchy the runtime needs."""
    dirs = []
    own = {}
    for line in open("/proc/self/cgroup"):
        _, ctrls, path = line.rstrip("\n").split(":", 2)
        for c in ctrls.split(","):
            own[c] = path
    for c in ("memory", "pids", "cpu", "cpuacct", "freezer", "cpuset"):
        mnt = f"/sys/fs/cgroup/{c}"
        if os.path.isdir(mnt) and c in own:
            dirs.append(os.path.join(mnt + own[c], f"sandboxd-{INSTANCE}"))
    return dirs


@pytest.fixture(scope="module")
def rootless_user(tmp_path_factory):
    need_root()
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("host lacks: cgroup v1 hierarchies (the VM tier runs the cgroup v2 rootless case)")
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        created = True
    pw = pwd.getpwnam(USER)
    saved = {f: open(f).read() if os.path.exists(f) else None for f in ("/etc/subuid", "/etc/subgid")}
    dirs = _own_cgroup_dirs()
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        for name in [""] + os.listdir(d):
            os.chown(os.path.join(d, name), pw.pw_uid, pw.pw_gid)
    import tempfile
    mnt_dir = tempfile.mkdtemp(prefix="sandboxd-rootless-")
    os.chown(mnt_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(mnt_dir, 0o755)      # run uids (subuids) must traverse to the root mountpoint
    yield pw, os.path.join(mnt_dir, "root"), saved
    shutil.rmtree(mnt_dir, ignore_errors=True)
    for d in dirs:
        for sub in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            p = os.path.join(d, sub)
            if os.path.isdir(p):
                os.rmdir(p)
        if os.path.isdir(d):
            os.rmdir(d)
    for f, text in saved.items():
        if text is None:
            if os.path.exists(f):
                os.remove(f)
        else:
            with open(f, "w") as fh:
                fh.write(text)
    if created:
        subprocess.run(["userdel", USER], check=False)


def _run_as(pw, mnt: str, mode: str) -> dict:
    script = SCRIPT.format(root=ROOT, instance=INSTANCE, mnt=mnt)
    r = subprocess.run(["runuser", "-u", USER, "--", sys.executable, "-c", script, mode],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_common(out: dict) -> None:
    assert out["status"] == "OK", out
    lines = out["stdout"].split("\n")
    assert lines[0] == "1000" and lines[2] == "ok"
    assert out["att"]["capabilities"]["CapEff"] == [] and out["att"]["capabilities"]["CapBnd"] == []
    assert out["att"]["no_new_privs"] == 1 and out["seccomp_mode"] == 2
    assert all(v["new"] for v in out["att"]["namespaces"].values())
    assert out["oom_status"] == "MEMORY_LIMIT"


def test_rootless_single_id_map(rootless_user):
    pw, mnt, _ = rootless_user
    out = _run_as(pw, mnt, "single")
    assert out["host"]["id_mapping"] == "single"
    _check_common(out)
    # Root inside? No: the workload is uid 1000 inside, mapped to the unprivileged user itself.
    assert out["att"]["uid_map"] == f"1000 {pw.pw_uid} 1"


def test_rootless_newuidmap_gives_per_run_uids(rootless_user):
    pw, mnt, _ = rootless_user
    if not shutil.which("newuidmap"):
        pytest.fail("newuidmap missing: scripts/setup.sh installs uidmap")
    for f in ("/etc/subuid", "/etc/subgid"):
        with open(f, "a") as fh:
            fh.write(f"{USER}:{SUB_START}:{SUB_COUNT}\n")
    out = _run_as(pw, mnt, "newuidmap")
    assert out["host"]["id_mapping"] == "newuidmap"
    _check_common(out)
    inside, host, count = out["att"]["uid_map"].split()
    assert inside == "1000" and SUB_START <= int(host) < SUB_START + SUB_COUNT and count == "1"
