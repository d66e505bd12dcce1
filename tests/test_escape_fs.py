"""Attacker's view of the filesystem layer: can a workload reach a host file, a host mount, or
init's view of the world? Every test runs a real workload in a real sandbox.

Most tests run twice: with every layer of the default plan ("all"), and with seccomp and
Landlock switched off ("bare"), so the mount namespace, pivot_root, the capability drop and
init's non-dumpable flag are shown to hold on their own (defence in depth).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import pytest

from sandboxd import planner
from sandboxd.errors import SandboxError
from sandboxd.plan import Bind, Limits, Status
from tests.sandbox_helpers import PY, plan, py, bare  # noqa: F401


LAYERS = {"all": lambda p: p, "bare": bare}


@pytest.fixture
def host_secret():
    """A world-readable file in a world-traversable host directory: if the workload ever got a
    path to the host's tree, plain DAC would let it read this."""
    d = tempfile.mkdtemp(prefix="sandboxd-escape-", dir="/tmp")
    os.chmod(d, 0o755)
    mark = f"HOST-SECRET-{os.getpid()}-{os.urandom(4).hex()}"
    path = os.path.join(d, "secret.txt")
    with open(path, "w") as f:
        f.write(mark)
    os.chmod(path, 0o644)
    yield path, mark
    shutil.rmtree(d, ignore_errors=True)


PROBE_PATHS = r"""
import os, json, sys
path, mark = sys.argv[1], sys.argv[2]
cands = [path, "/proc/1/root" + path, "/proc/self/root" + path, "/proc/1/cwd/../../.." + path,
         "/proc/self/cwd/../../../.." + path, "/../../.." + path, "/dev/fd/0/.." + path]
for pid in os.listdir("/proc"):
    if pid.isdigit():
        cands += ["/proc/%s/root%s" % (pid, path), "/proc/%s/cwd/../../..%s" % (pid, path)]
out = {}
for c in cands:
    try:
        with open(c) as f:
            out[c] = "READ:" + f.read()
    except OSError as e:
        out[c] = "errno %d" % e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_host_file_unreachable_by_any_path(runtime, host_secret, layer):
    path, mark = host_secret
    r = runtime.run(LAYERS[layer](plan([PY, "-c", PROBE_PATHS, path, mark])))
    assert r.status == Status.OK, (r.status, r.stderr)
    res = json.loads(r.stdout)
    leaked = {k: v for k, v in res.items() if mark in v}
    assert not leaked, leaked
    assert len(res) >= 7


PROC1 = r"""
import os, json
out = {}
def probe(name, fn):
    try:
        out[name] = "OK " + repr(fn())[:80]
    except OSError as e:
        out[name] = "errno %d" % e.errno
probe("ls fd", lambda: os.listdir("/proc/1/fd"))
probe("ls fdinfo", lambda: os.listdir("/proc/1/fdinfo"))
probe("root", lambda: os.readlink("/proc/1/root"))
probe("ls root", lambda: os.listdir("/proc/1/root/"))
probe("cwd", lambda: os.readlink("/proc/1/cwd"))
probe("exe", lambda: os.readlink("/proc/1/exe"))
probe("environ", lambda: open("/proc/1/environ", "rb").read())
probe("mem", lambda: open("/proc/1/mem", "rb").read(1))
probe("maps", lambda: open("/proc/1/maps").read())
probe("map_files", lambda: os.listdir("/proc/1/map_files"))
probe("fd/0", lambda: open("/proc/1/fd/0", "rb").read(1))
probe("fd/1", lambda: open("/proc/1/fd/1", "wb"))
probe("ns/user", lambda: open("/proc/1/ns/user"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_init_is_opaque_to_the_workload(runtime, layer):
    """init (pid 1) holds host-side fds (the launcher's stdio, the status pipe) and was set up
    with every capability of the run's user namespace: none of it may be reachable."""
    r = runtime.run(LAYERS[layer](py(PROC1)))
    assert r.status == Status.OK, (r.status, r.stderr)
    res = json.loads(r.stdout)
    opened = {k: v for k, v in res.items() if v.startswith("OK")}
    assert not opened, opened


FDS = r"""
import os, json
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
st = {}
for line in open("/proc/self/status"):
    k, _, v = line.partition(":")
    if k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
        st[k] = v.strip()
print(json.dumps({"fds": fds, "cwd": os.getcwd(), "root": os.readlink("/proc/self/root"), "status": st}))
"""


def test_workload_holds_only_stdio(runtime):
    """Nothing of the launcher, supervisor or init (sync socket, status pipe, notify fd,
    cgroup or namespace fds) reaches the program: fds 0-2 and the one listdir opened."""
    r = runtime.run(py(FDS), stdin=b"x")
    assert r.status == Status.OK, r.stderr
    res = json.loads(r.stdout)
    fds = res["fds"]
    assert set(fds) - {"0", "1", "2"} <= {"3"}, fds        # 3: listdir's own directory fd
    if "3" in fds:
        assert fds["3"].startswith("/proc/"), fds
    assert fds["0"].startswith("/memfd:sandboxd-stdin"), fds
    assert fds["1"].startswith("pipe:") and fds["2"].startswith("pipe:"), fds
    assert res["root"] == "/" and res["cwd"] == "/box"
    st = res["status"]
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[k], 16) == 0, st
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


MOUNTS = r"""
import json
rows = []
for line in open("/proc/self/mountinfo"):
    a, _, b = line.partition(" - ")
    f = a.split()
    g = b.split()
    rows.append({"root": f[3], "mp": f[4], "opts": f[5], "fstype": g[0], "src": g[1]})
print(json.dumps(rows))
"""


def test_mount_table_is_exactly_the_plan(runtime):
    p = py(MOUNTS)
    fs = p.filesystem
    allowed = {"/", fs.work_dir, "/dev", "/proc"}
    allowed |= {b.target for b in fs.binds} | {t.target for t in fs.tmpfs}
    allowed |= {"/dev/" + n for n in fs.dev_nodes}
    allowed |= set(fs.proc_masked) | set(fs.proc_readonly)
    r = runtime.run(p)
    assert r.status == Status.OK, r.stderr
    rows = json.loads(r.stdout)
    extra = [m for m in rows if m["mp"] not in allowed]
    assert not extra, extra
    root = [m for m in rows if m["mp"] == "/"]
    assert len(root) == 1 and root[0]["fstype"] == "tmpfs" and root[0]["src"] == "sandboxd"
    assert root[0]["opts"].split(",")[0] == "ro"
    # Every host bind is read-only, nosuid and nodev (device nodes, and /dev/null bound over the
    # masked /proc files, are the only nodes there are, and need dev).
    devs = {"/dev/" + n for n in fs.dev_nodes} | set(fs.proc_masked)
    for m in rows:
        if m["fstype"] not in ("tmpfs", "proc") and m["mp"] not in devs:
            opts = m["opts"].split(",")
            assert "ro" in opts and "nosuid" in opts and "nodev" in opts, m


SHOCKER = r"""
import ctypes, os, struct
l = ctypes.CDLL(None, use_errno=True)
l.syscall.restype = ctypes.c_long
# struct file_handle { u32 handle_bytes; int handle_type; u8 f_handle[8]; }: FILEID_INO32_GEN (1),
# inode 2 (the root directory of an ext2/3/4 filesystem), generation 0 -- the classic "shocker".
h = ctypes.create_string_buffer(struct.pack("=Ii", 8, 1) + struct.pack("=II", 2, 0))
for mnt in ("/usr", "/etc/ld.so.cache", "/box"):
    try:
        fd = os.open(mnt, os.O_RDONLY)
    except OSError as e:
        print(mnt, "skip", e.errno)
        continue
    r = l.syscall(304, fd, h, os.O_RDONLY | os.O_DIRECTORY)   # open_by_handle_at
    e = ctypes.get_errno()
    if r >= 0:
        print(mnt, "OPENED", os.listdir(r)[:5])
    else:
        print(mnt, "denied", e)
buf = ctypes.create_string_buffer(struct.pack("=Ii", 128, 0) + b"\0" * 128)
mid = ctypes.c_int(0)
r = l.syscall(303, -100, b"/usr", buf, ctypes.byref(mid), 0)   # name_to_handle_at
print("name_to_handle_at", r, ctypes.get_errno())
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_open_by_handle_at_cannot_reach_host_root(runtime, layer):
    r = runtime.run(LAYERS[layer](py(SHOCKER)))
    assert r.status == Status.OK, (r.status, r.stderr)
    out = r.stdout.decode()
    assert "OPENED" not in out, out
    assert out.count("denied 1") >= 2, out            # EPERM: seccomp, or no CAP_DAC_READ_SEARCH


PROC_WRITES = r"""
import os, json
targets = ["/proc/sys/kernel/hostname", "/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches",
           "/proc/sysrq-trigger", "/proc/self/attr/current", "/proc/self/attr/exec",
           "/proc/1/oom_score_adj", "/proc/self/uid_map", "/proc/self/setgroups",
           "/proc/sys/user/max_user_namespaces", "/proc/sys/kernel/ns_last_pid",
           "/proc/self/ns/../../1/comm", "/proc/sys/net/ipv4/ip_forward", "/proc/kcore",
           "/proc/sys/fs/binfmt_misc/register", "/proc/self/loginuid", "/proc/self/timerslack_ns"]
out = {}
for t in targets:
    try:
        fd = os.open(t, os.O_WRONLY)
        try:
            os.write(fd, b"0\n")
            out[t] = "WROTE"
        finally:
            os.close(fd)
    except OSError as e:
        out[t] = "errno %d" % e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_proc_writes_that_matter_fail(runtime, layer):
    r = runtime.run(LAYERS[layer](py(PROC_WRITES)))
    assert r.status == Status.OK, (r.status, r.stderr)
    res = json.loads(r.stdout)
    wrote = {k for k, v in res.items() if v == "WROTE"}
    # timerslack_ns of oneself is harmless and allowed by the kernel; nothing else may succeed.
    assert wrote <= {"/proc/self/timerslack_ns"}, res


MOUNTS_TRY = r"""
import ctypes, os
l = ctypes.CDLL(None, use_errno=True)
l.syscall.restype = ctypes.c_long
def t(name, r):
    print(name, r, ctypes.get_errno() if r != 0 else 0)
t("mount-tmpfs", l.mount(b"none", b"/tmp", b"tmpfs", 0, None))
t("mount-proc", l.mount(b"proc", b"/tmp", b"proc", 0, None))
t("bind-usr", l.mount(b"/usr", b"/tmp", None, 4096, None))
t("remount-root-rw", l.mount(None, b"/", None, 32 | 4096, None))
t("remount-usr-rw", l.mount(None, b"/usr", None, 32 | 4096, None))
t("umount-proc-masked", l.umount2(b"/proc/kcore", 2))
t("umount-usr", l.umount2(b"/usr", 2))
t("chroot", l.chroot(b"/tmp"))
t("pivot_root", l.syscall(155, b"/tmp", b"/tmp"))
t("open_tree", 0 if l.syscall(428, -100, b"/usr", 1) >= 0 else -1)
t("fsopen", 0 if l.syscall(430, b"tmpfs", 0) >= 0 else -1)
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_no_mount_operation_succeeds(runtime, layer):
    r = runtime.run(LAYERS[layer](py(MOUNTS_TRY)))
    assert r.status == Status.OK, (r.status, r.stderr)
    lines = r.stdout.decode().split("\n")[:-1]
    assert len(lines) == 11, lines
    ok = [ln for ln in lines if ln.split()[1] != "-1"]
    assert not ok, lines


def test_bind_target_through_a_symlink_in_a_writable_bind_is_refused(runtime):
    """A writable host directory (the work dir) is under the tenant's control: a symlink in it
    must not redirect a later mount onto the host."""
    top = tempfile.mkdtemp(prefix="sandboxd-escape-", dir="/tmp")
    try:
        os.chmod(top, 0o755)                        # init mounts as the run's host uid
        work = os.path.join(top, "work")
        src = os.path.join(top, "src")
        os.mkdir(work)
        os.mkdir(src, 0o755)
        os.symlink("/etc", os.path.join(work, "link"))
        p = planner.build_plan(["/bin/true"], work_host_path=work,
                               binds=(Bind(source=src, target="/box/link/sandboxd-escape"),))
        with pytest.raises(SandboxError) as ei:
            runtime.run(p)
        assert "symlink" in str(ei.value), ei.value
        assert not os.path.exists("/etc/sandboxd-escape")
    finally:
        shutil.rmtree(top, ignore_errors=True)


# /proc/self/fd/0 of a directory fd is a way out of the new root: cd there and read.
DIRSTDIN = "cd /proc/self/fd/0 && cat secret.txt"


def test_directory_as_stdin_is_refused(runtime, host_secret):
    # A host directory fd as stdin would be an openat() root outside the sandbox (only Landlock
    # would stop it): the launcher refuses it before anything runs, with or without Landlock.
    path, mark = host_secret
    for p in (plan(["/bin/sh", "-c", DIRSTDIN]), bare(plan(["/bin/sh", "-c", DIRSTDIN]))):
        with pytest.raises(SandboxError) as ei:
            runtime.run(p, stdin=os.path.dirname(path))
        assert ei.value.step == "stdin" and "directory" in str(ei.value)


def test_stdin_must_be_data_not_a_handle(runtime, tmp_path):
    """The launcher refuses a directory, a socket or a device as stdin (the error names stdin)."""
    import socket as _socket
    a, b = _socket.socketpair()
    try:
        for bad in (str(tmp_path), a.fileno(), os.open("/dev/zero", os.O_RDONLY)):
            with pytest.raises(SandboxError) as ei:
                runtime.run(plan(["/bin/true"]), stdin=bad)
            assert ei.value.step == "stdin", ei.value
    finally:
        a.close()
        b.close()
    assert runtime.run(plan(["/bin/cat"]), stdin=b"ok").stdout == b"ok"
