"""The run's init in C (sbx-exec init, build_main): driven here the way the supervisor drives it.

The root-building ops are compiled by mounts.compile_root (unit tests below need no kernel);
the rest spawns the real init with sandbox.spawn_init, maps its ids as the launcher's host
worker would, and speaks its protocol: F<pid> from the spawner, PLACED, NAMESPACED, LAYOUT, then
STAGED (or ERROR) from init on the sync socket and W from its fork, the workload.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import tempfile
import time

import pytest

from sandboxd import planner
from sandboxd.errors import PlanError
from sandboxd.plan import Bind, FilesystemPlan, Tmpfs
from sandboxd.runtime import landlock, linux, mounts, protocol, sandbox, stubgo

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="host lacks: root (init's ids are mapped by root)")


# --- compile_root: pure ---------------------------------------------------------------------------
def _fs(**kw) -> FilesystemPlan:
    return dataclasses.replace(planner.build_plan(["x"]).filesystem, **kw)


def test_compile_root_orders_parents_first_and_ends_with_the_pivot():
    fs = _fs(binds=(Bind("/usr", "/usr"), Bind("/srv/data", "/work/in/data", writable=True),
                    Bind("/opt/x", "/opt/x", optional=True)),
             tmpfs=(Tmpfs("/tmp", 1 << 20, 0o1777),), work_dir="/work")
    ops = mounts.compile_root(fs, "/run/r")
    assert ops[0] == ("mount", "", "/", "", linux.MS_REC | linux.MS_PRIVATE, "")
    assert ops[1][:3] == ("mount", "sandboxd", "/run/r")
    targets = [op[2] if op[0] == "bind" else op[1] for op in ops if op[0] in ("bind", "tmpfs")]
    assert targets.index("/work") < targets.index("/work/in/data")
    assert targets.index("/dev") < targets.index("/dev/null")
    assert ("bind", "/srv/data", "/work/in/data", mounts.B_WRITABLE) in ops
    assert ("bind", "/opt/x", "/opt/x", mounts.B_OPTIONAL) in ops
    assert ("bind", "/usr", "/usr", 0) in ops                      # read-only, nodev
    assert ("tmpfs", "/tmp", 1 << 20, "1777", 0) in ops
    assert ("bind", "/dev/null", "/dev/null", mounts.B_WRITABLE | mounts.B_DEVICE) in ops
    names = [op[0] for op in ops]
    assert names.index("proc") < names.index("mask") < names.index("pivot")
    assert names[-1] in ("pivot", "rootro") and names.count("pivot") == 1


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/a//b", "/a/"])
def test_compile_root_refuses_a_target_that_is_not_absolute_and_normalised(bad):
    with pytest.raises(PlanError):
        mounts.compile_root(_fs(binds=(Bind("/usr", bad),)), "/run/r")


def test_encode_layout_refuses_nul_and_oversize():
    kw = dict(root="/r", hostname="h", cwd="/", uid=1, gid=1, keep_caps=0, cpu_arg="-", landlock=None)
    blob = stubgo.encode_layout(ops=[("pivot",)], **kw)
    assert blob.split(b"\0")[:11] == [b"SBXL1", b"/r", b"h", b"/", b"1", b"1", b"0", b"-", b"1", b"pivot", b"0"]
    with pytest.raises(PlanError):
        stubgo.encode_layout(ops=[("file", "/etc/x", "a\0b")], **kw)
    with pytest.raises(PlanError):
        stubgo.encode_layout(ops=[("file", "/etc/x", "a" * stubgo.MAX_LAYOUT)], **kw)


# --- the real init ----------------------------------------------------------------------------------
class Init:
    """One init, spawned as the supervisor spawns it; its ids mapped to nobody."""

    def __init__(self) -> None:
        self.out_r, out_w = os.pipe2(os.O_CLOEXEC)
        self.status_r, status_w = os.pipe2(os.O_CLOEXEC)
        self.sync, sync_c = protocol.seqpacket_pair()
        self.isock, isock_c = protocol.seqpacket_pair()
        stub_fd = stubgo.open_stub()
        try:
            spid = sandbox.spawn_init(stub_fd, out_w, out_w, sync_c.fileno(), status_w, isock_c.fileno())
        finally:
            os.close(stub_fd)
        for fd in (out_w, status_w):
            os.close(fd)
        sync_c.close()
        isock_c.close()
        kind, payload, _ = protocol.recv(self.isock)
        assert os.waitpid(spid, 0)[1] == 0
        assert kind == b"F"
        self.pid = int(payload)
        self.status: int | None = None
        for f in ("uid_map", "gid_map"):
            with open(f"/proc/{self.pid}/{f}", "w") as m:
                m.write("1000 65534 1\n")

    def namespaced(self) -> bytes:
        protocol.send(self.isock, protocol.PLACED, b"1000 1000 1")
        return protocol.recv(self.isock)[0]

    def layout(self, blob: bytes) -> tuple[bytes, dict | None]:
        """LAYOUT, then init's answer on the sync socket: (STAGED or ERROR, its JSON)."""
        protocol.send(self.isock, protocol.LAYOUT, blob)
        self.sync.settimeout(10)
        kind, payload, _ = protocol.recv(self.sync)
        return kind, (json.loads(payload) if payload else None)

    def wait(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()
        for s in (self.sync, self.isock):
            s.close()
        for fd in (self.out_r, self.status_r):
            os.close(fd)


def _blob(tmp_path, fs: FilesystemPlan, **kw) -> bytes:
    # The mountpoint must be reachable by init's ids (nobody on the host), as
    # /run/sandboxd/root is: pytest's own directories are not.
    root = tmp_path / "root"
    if not root.exists():
        d = tempfile.mkdtemp(prefix="sbx-init-test-", dir="/run")
        os.chmod(d, 0o755)
        root.symlink_to(d)
        _made.append(d)
    root = root.resolve()
    args = dict(root=str(root), hostname="built", cwd="/", uid=1000, gid=1000, keep_caps=0,
                cpu_arg="-", landlock=None, ops=mounts.compile_root(fs, str(root)))
    args.update(kw)
    return stubgo.encode_layout(**args)


_made: list[str] = []


@pytest.fixture(autouse=True)
def _remove_roots():
    yield
    while _made:
        os.rmdir(_made.pop())


@pytest.fixture
def init():
    i = Init()
    yield i
    i.close()


@root_only
def test_init_is_c_from_the_start_and_pid_1_of_its_own_namespaces(init, tmp_path):
    assert init.namespaced() == b"M"                          # init has named itself by now
    with open(f"/proc/{init.pid}/status") as f:
        status = dict(ln.split(":", 1) for ln in f.read().splitlines())
    assert status["Name"].strip() == "sbx-init"
    assert status["NSpid"].split()[-1] == "1"
    assert status["PPid"].strip() == str(os.getpid())      # CLONE_PARENT: the spawner's parent
    assert int(status["VmRSS"].split()[0]) < 4096           # not a copy of an interpreter
    assert os.readlink(f"/proc/{init.pid}/exe").endswith("sbx-exec")
    assert os.readlink(f"/proc/{init.pid}/ns/user") != os.readlink("/proc/self/ns/user")
    for ns in ("mnt", "net", "ipc", "uts", "cgroup"):
        assert os.readlink(f"/proc/{init.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    kind, att = init.layout(_blob(tmp_path, _fs()))
    assert kind == protocol.STAGED, att
    assert att["landlock"] is None and att["ns"]["pid"] == os.readlink(f"/proc/{init.pid}/ns/pid_for_children")
    assert "NoNewPrivs:\t1" in att["status"] and "CapEff:\t0000000000000000" in att["status"]
    assert protocol.recv(init.sync)[0] == protocol.WAITING       # the workload waits for GO
    # The root was built in init's mount namespace only, and init is in it.
    assert not os.listdir((tmp_path / "root").resolve())
    assert set(os.listdir(f"/proc/{init.pid}/root/dev")) >= {"null", "shm", "urandom", "zero"}
    assert set(os.listdir(f"/proc/{init.pid}/root")) >= {"usr", "proc", "tmp", "etc"}


@root_only
def test_init_runs_the_workload_and_reports_its_status(init, tmp_path):
    assert init.namespaced() == b"M"
    kind, att = init.layout(_blob(tmp_path, _fs()))
    assert kind == protocol.STAGED, att
    assert protocol.recv(init.sync)[0] == protocol.WAITING
    p = planner.build_plan(["/bin/sh", "-c", "hostname; id -u; pwd; exit 9"], env={"PATH": "/usr/bin:/bin"})
    fd = os.open("/dev/null", os.O_RDONLY)
    protocol.send_raw(init.sync, stubgo.encode(p, bpf=None, seccomp_flags=0, landlock=False,
                                               exec_rule=None), fds=[fd])
    os.close(fd)
    assert protocol.recv(init.sync)[0] == protocol.EXEC
    rep = json.loads(os.read(init.status_r, 4096))
    assert os.WIFEXITED(rep["wait_status"]) and os.WEXITSTATUS(rep["wait_status"]) == 9
    assert os.read(init.out_r, 4096) == b"built\n1000\n/\n"


@root_only
@pytest.mark.parametrize("mangle, what", [
    (lambda b: b"XXXXX" + b[5:], "bad magic"),
    (lambda b: b.replace(b"pivot\0", b"fly\0"), "unknown op"),
    (lambda b: b"\0".join(b.split(b"\0")[:6]) + b"\0", "cut short"),
    (lambda b: b + b"extra\0", "trailing bytes"),
    (lambda b: b[:-1], "unterminated"),
])
def test_init_refuses_a_malformed_layout(init, tmp_path, mangle, what):
    fs = _fs(root_readonly=False)
    assert init.namespaced() == b"M"
    kind, err = init.layout(mangle(_blob(tmp_path, fs)))
    assert kind == protocol.ERROR and err["step"] == "init" and what in err["message"], err
    assert os.WIFEXITED(init.wait()) and os.WEXITSTATUS(init.wait()) == 127


@root_only
def test_init_refuses_a_mount_target_through_a_symlink(init, tmp_path):
    # /bin is the plan's own symlink to usr/bin: a bind at /bin/evil would land in the host's
    # /usr/bin (bound in) if init followed it.
    fs = _fs(binds=_fs().binds + (Bind("/etc/hostname", "/bin/evil"),))
    assert any(t == "/bin" for t, _ in fs.symlinks)
    assert init.namespaced() == b"M"
    kind, err = init.layout(_blob(tmp_path, fs))
    assert kind == protocol.ERROR, err
    assert (err["step"], err["path"], err["errno"]) == ("mount", "/bin/evil", None)
    assert "traverses a symlink" in err["message"]
    assert not os.path.exists("/usr/bin/evil")


@root_only
def test_init_names_a_missing_bind_source_and_skips_an_optional_one(tmp_path):
    missing = "/nonexistent-sbx-test/nope"
    i = Init()
    try:
        assert i.namespaced() == b"M"
        kind, att = i.layout(_blob(tmp_path, _fs(binds=_fs().binds + (Bind(missing, "/opt/x", optional=True),))))
        assert kind == protocol.STAGED, att
    finally:
        i.close()
    i = Init()
    try:
        assert i.namespaced() == b"M"
        kind, err = i.layout(_blob(tmp_path, _fs(binds=_fs().binds + (Bind(missing, "/opt/x"),))))
        assert kind == protocol.ERROR
        assert (err["step"], err["path"], err["errno"]) == ("bind_mount", missing, 2), err
    finally:
        i.close()


@root_only
def test_init_exits_quietly_when_the_spare_is_retired():
    i = Init()
    i.isock.close()                           # the supervisor went away before PLACED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid, status = os.waitpid(i.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.01)
    assert pid == i.pid and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    i.status = status
    i.sync.settimeout(1)
    assert i.sync.recv(16) == b""             # and said nothing
    i.close()


@root_only
def test_spawn_init_leaves_no_fd_behind():
    gc.collect()                              # earlier garbage closing meanwhile would look like a change
    before = set(os.listdir("/proc/self/fd"))
    i = Init()
    i.close()
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) == before


@root_only
@pytest.mark.skipif(landlock.abi_version() == 0, reason="host lacks: landlock (abi_version() == 0)")
def test_landlock_rules_match_the_root_that_init_builds(init, tmp_path):
    """resolve() names paths inside the new root; every one of them must exist there once init
    has built it and pivoted, and the workload must work within them and nowhere else."""
    fs = FilesystemPlan(
        binds=(Bind("/usr", "/usr"), Bind("/lib64", "/lib64", optional=True),
               Bind("/etc/ssl", "/etc/ssl", optional=True)),
        tmpfs=(Tmpfs("/tmp", 1 << 20),),
        symlinks=(("/bin", "usr/bin"), ("/lib", "usr/lib")),
        files=(("/etc/passwd", "root:x:0:0::/:/bin/sh\n"),))
    plan = dataclasses.replace(planner.build_plan(["/bin/sh"]), filesystem=fs)
    rules = landlock.resolve(plan, landlock.abi_version())
    prepared = landlock.prepare(rules)
    assert init.namespaced() == b"M"
    kind, att = init.layout(_blob(tmp_path, fs, landlock=prepared))
    assert kind == protocol.STAGED, att
    assert att["landlock"]["path_rules"] + len(att["landlock"]["skipped_optional"]) == len(prepared.paths)
    assert protocol.recv(init.sync)[0] == protocol.WAITING
    script = ("cat /etc/passwd; echo hi > /tmp/x && cat /tmp/x; "
              "cp /bin/true /tmp/t; /tmp/t; echo tmp_exec=$?; "
              "cp /bin/true /box/t; /box/t; echo box_exec=$?; "
              "head -c 4 /proc/self/status; echo; ls / >/dev/null 2>&1; echo ls_root=$?")
    run = planner.build_plan(["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"})
    fd = os.open("/dev/null", os.O_RDONLY)
    protocol.send_raw(init.sync, stubgo.encode(run, bpf=None, seccomp_flags=0, landlock=True,
                                               exec_rule=landlock.exec_rule(rules, "/bin/sh", fs.symlinks)),
                      fds=[fd])
    os.close(fd)
    kind, payload, _ = protocol.recv(init.sync)
    assert kind == protocol.EXEC, payload
    rep = json.loads(os.read(init.status_r, 4096))
    out = b""
    while chunk := os.read(init.out_r, 65536):
        out += chunk
        if os.WIFEXITED(rep["wait_status"]) and b"ls_root=" in out:
            break
    lines = out.decode().splitlines()
    assert [ln for ln in lines if "Permission denied" not in ln] == [
        "root:x:0:0::/:/bin/sh", "hi", "tmp_exec=126", "box_exec=0", "Name", "ls_root=2"], out
    assert any("/tmp/t: Permission denied" in ln for ln in lines)


@root_only
def test_init_builds_a_root_without_proc(init, tmp_path):
    """The capability drop needs the highest capability number: read from the host's /proc in
    phase A, since a root without /proc has none to read it from."""
    assert init.namespaced() == b"M"
    kind, att = init.layout(_blob(tmp_path, _fs(proc=False)))
    assert kind == protocol.STAGED, att
    assert att["status"] == ""                    # no /proc to read it from
    assert not os.path.exists(f"/proc/{init.pid}/root/proc")
    with open(f"/proc/{init.pid}/status") as f:
        assert "CapBnd:\t0000000000000000" in f.read()


@root_only
def test_init_sends_a_decodable_error_for_a_long_non_ascii_path(init, tmp_path):
    """Strings in ERROR frames are cut to fit, but never inside a UTF-8 sequence."""
    missing = "/nonexistent-sbx-test/" + "/".join(["\u00e9" * 100] * 21)
    assert init.namespaced() == b"M"
    kind, err = init.layout(_blob(tmp_path, _fs(binds=_fs().binds + (Bind(missing, "/opt/x"),))))
    # (ENAMETOOLONG: a path longer than the frame's room for it is longer than PATH_MAX too)
    assert kind == protocol.ERROR and err["step"] == "bind_mount" and err["errno"] == 36, err
    assert missing.startswith(err["path"]) and len(err["path"]) > 1000


@root_only
def test_init_takes_a_layout_of_the_largest_size(tmp_path):
    """stubgo.MAX_LAYOUT is what init takes: the largest blob encode_layout accepts arrives whole
    (one byte more is refused by the encoder, never cut by the socket)."""
    fs = _fs(root_readonly=False)
    base = _blob(tmp_path, fs, ops=mounts.compile_root(fs, str((tmp_path / "root").resolve())) + [])
    ops = mounts.compile_root(dataclasses.replace(fs, files=fs.files + (("/etc/pad", ""),)),
                              str((tmp_path / "root").resolve()))
    pad = stubgo.MAX_LAYOUT - 1 - len(_blob(tmp_path, fs, ops=ops))
    assert pad > 0 and base
    big = dataclasses.replace(fs, files=fs.files + (("/etc/pad", "x" * pad),))
    ops = mounts.compile_root(big, str((tmp_path / "root").resolve()))
    blob = _blob(tmp_path, big, ops=ops)
    assert len(blob) == stubgo.MAX_LAYOUT - 1
    i = Init()
    try:
        assert i.namespaced() == b"M"
        kind, att = i.layout(blob)
        assert kind == protocol.STAGED, att
        assert os.path.getsize(f"/proc/{i.pid}/root/etc/pad") == pad
    finally:
        i.close()
    big = dataclasses.replace(fs, files=fs.files + (("/etc/pad", "x" * (pad + 1)),))
    with pytest.raises(PlanError):
        _blob(tmp_path, big, ops=mounts.compile_root(big, str((tmp_path / "root").resolve())))
