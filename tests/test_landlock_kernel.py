"""Landlock on the real kernel: each test restricts a forked child and watches operations fail.

Landlock is irreversible and inherited, so every restriction happens in a child of the test
process (fork, apply, probe, report over a pipe, _exit). Paths are host paths here: without a
pivot_root the "inside the new root" view of the plan is simply the host's. Each denial is paired
with a control showing the same operation succeeds without the rule (the parent, or a child with
a looser plan), so a test fails if Landlock stops denying.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

from sandboxd.errors import LaunchError
from sandboxd.plan import Bind, FilesystemPlan, LandlockPlan, Plan
from sandboxd.runtime import landlock as ll
from sandboxd.runtime import linux

ABI = ll.abi_version()
pytestmark = pytest.mark.skipif(ABI == 0, reason="host lacks: landlock (abi_version() == 0)")
needs_net = pytest.mark.skipif(ABI < 4, reason=f"host lacks: landlock ABI 4 (TCP rules); host has ABI {ABI}")
needs_scope = pytest.mark.skipif(ABI < 6, reason=f"host lacks: landlock ABI 6 (scoping); host has ABI {ABI}")

set_nnp = linux.set_no_new_privs


def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn in a forked child; return its dict, or fail the test with the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            out = json.dumps({"ok": fn()}).encode()
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            out = json.dumps({"error": traceback.format_exc()}).encode()
            code = 1
        try:
            while out:
                out = out[os.write(w, out):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(b"".join(chunks) or b'{"error": "child died without a report"}')
    if "error" in res:
        pytest.fail("child failed:\n" + res["error"])
    return res["ok"]


def attempt(fn: Callable[[], Any]) -> str:
    """'ok', or the errno name the operation failed with."""
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def read(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: Path | str, data: bytes = b"x", mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """ro/ (read-only bind), rw/ (writable bind), box/ (work dir), secret/ (not in the plan)."""
    for d in ("ro", "rw", "box", "secret", "rw/sub1", "rw/sub2"):
        (tmp_path / d).mkdir()
    (tmp_path / "ro" / "data.txt").write_bytes(b"readable")
    (tmp_path / "secret" / "secret.txt").write_bytes(b"top secret")
    (tmp_path / "single.txt").write_bytes(b"one file")
    (tmp_path / "sibling.txt").write_bytes(b"not granted")
    (tmp_path / "rw" / "sub1" / "f").write_bytes(b"move me")
    for d in ("ro", "rw", "box"):
        shutil.copy2("/usr/bin/true", tmp_path / d / "true")
    return tmp_path


def make_plan(tree: Path, **landlock: Any) -> Plan:
    fs = FilesystemPlan(
        binds=(Bind("/usr", "/usr"),
               Bind("/lib64", "/lib64", optional=True),          # the loader, on non-merged hosts
               Bind(str(tree / "ro"), str(tree / "ro")),
               Bind(str(tree / "rw"), str(tree / "rw"), writable=True),
               Bind(str(tree / "single.txt"), str(tree / "single.txt"))),  # a file bind
        work_dir=str(tree / "box"),
    )
    return Plan(argv=("/usr/bin/true",), filesystem=fs, landlock=LandlockPlan(**landlock))


def sandboxed(plan: Plan, probe: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """resolve + prepare in the parent (as the launcher does), apply + probe in a child."""
    prepared = ll.prepare(ll.resolve(plan, ABI))

    def child() -> dict[str, Any]:
        set_nnp()
        att = ll.apply(prepared)
        return {"att": att, **probe(att)}
    return in_child(child)


def without_att(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "att"}


# --- filesystem -------------------------------------------------------------------------------
def test_read_outside_the_plan_is_denied(tree: Path):
    secret = tree / "secret" / "secret.txt"
    # Control: nothing but Landlock stands in the way (we are root, the files are ours).
    assert read(secret) == b"top secret" and read("/etc/hostname") and read(tree / "sibling.txt")
    res = sandboxed(make_plan(tree), lambda _: {
        "secret": attempt(lambda: read(secret)),
        "etc": attempt(lambda: read("/etc/hostname")),
        "list_secret": attempt(lambda: os.listdir(tree / "secret")),
        "sibling": attempt(lambda: read(tree / "sibling.txt")),
        "single": read(tree / "single.txt").decode(),
        "ro": read(tree / "ro" / "data.txt").decode(),
        "usr": attempt(lambda: read("/usr/bin/true")),
        "proc": attempt(lambda: read("/proc/self/status")),
    })
    assert res["secret"] == "EACCES" and res["etc"] == "EACCES" and res["list_secret"] == "EACCES"
    assert res["sibling"] == "EACCES"               # a file rule grants that file alone
    assert res["single"] == "one file" and res["ro"] == "readable"
    assert res["usr"] == "ok" and res["proc"] == "ok"


def test_denial_survives_exec(tree: Path):
    """The domain is inherited: a program started after apply() is confined the same way."""
    secret = str(tree / "secret" / "secret.txt")

    def probe(_):
        p = subprocess.run(["/usr/bin/cat", secret], capture_output=True)
        return {"rc": p.returncode, "err": p.stderr.decode()}
    res = sandboxed(make_plan(tree), probe)
    assert res["rc"] == 1 and "Permission denied" in res["err"]


def test_read_only_paths_cannot_be_written(tree: Path):
    data = tree / "ro" / "data.txt"
    res = sandboxed(make_plan(tree), lambda _: {
        "write": attempt(lambda: write(data, mode="ab")),
        "create": attempt(lambda: write(tree / "ro" / "new")),
        "truncate": attempt(lambda: os.truncate(data, 0)),
        "unlink": attempt(lambda: os.unlink(data)),
        "mkdir": attempt(lambda: os.mkdir(tree / "ro" / "d")),
        "proc_write": attempt(lambda: write("/proc/self/comm", b"renamed")),
        "single_write": attempt(lambda: write(tree / "single.txt", mode="ab")),
    })
    for k in ("write", "create", "truncate", "unlink", "mkdir", "proc_write", "single_write"):
        assert res[k] == "EACCES", (k, res[k])
    assert data.read_bytes() == b"readable" and not (tree / "ro" / "new").exists()
    # Control: the same writes work without Landlock (the host mount is writable).
    write(tree / "ro" / "new")
    os.truncate(tree / "single.txt", 0)


def test_read_write_paths_work(tree: Path):
    rw = tree / "rw"

    def probe(_):
        write(rw / "a", b"hello")
        os.mkdir(rw / "d")
        os.symlink("a", rw / "link")
        os.mkfifo(rw / "fifo")
        os.rename(rw / "sub1" / "f", rw / "sub2" / "f")         # REFER: across directories
        os.truncate(rw / "a", 2)
        os.unlink(rw / "link")
        write(tree / "box" / "out", b"work")
        return {"a": read(rw / "a").decode(),
                # A device node is a way to hardware: never creatable, even in rw trees.
                "mknod_char": attempt(lambda: os.mknod(rw / "null2", 0o600 | 0o020000, os.makedev(1, 3)))}
    res = sandboxed(make_plan(tree), probe)
    assert res["a"] == "he" and res["mknod_char"] == "EACCES"
    assert (rw / "sub2" / "f").read_bytes() == b"move me" and (rw / "fifo").exists()
    assert (tree / "box" / "out").read_bytes() == b"work" and not (rw / "null2").exists()


def test_exec_only_from_exec_paths(tree: Path):
    def run(path: Path | str) -> str:
        try:
            return str(subprocess.run([str(path)]).returncode)
        except OSError as e:
            return errno.errorcode[e.errno]
    # Control: every copy runs without Landlock.
    assert {run(tree / d / "true") for d in ("ro", "rw", "box")} == {"0"}
    res = sandboxed(make_plan(tree), lambda _: {
        "usr": run("/usr/bin/true"), "box": run(tree / "box" / "true"),
        "ro": run(tree / "ro" / "true"), "rw": run(tree / "rw" / "true")})
    assert without_att(res) == {"usr": "0", "box": "0", "ro": "EACCES", "rw": "EACCES"}


def test_argv0_file_rule_makes_just_that_program_executable(tree: Path):
    plan = make_plan(tree)
    plan = Plan(argv=(str(tree / "ro" / "true"),), filesystem=plan.filesystem, landlock=plan.landlock)
    (tree / "ro" / "other").write_bytes((tree / "ro" / "true").read_bytes())
    (tree / "ro" / "other").chmod(0o755)

    def probe(_):
        out = {}
        for name in ("true", "other"):
            try:
                out[name] = str(subprocess.run([str(tree / "ro" / name)]).returncode)
            except OSError as e:
                out[name] = errno.errorcode[e.errno]
        return out
    res = sandboxed(plan, probe)
    assert res["true"] == "0" and res["other"] == "EACCES"


def test_dev_nodes(tree: Path):
    res = sandboxed(make_plan(tree), lambda _: {
        "null_w": attempt(lambda: write("/dev/null")),
        "zero_r": attempt(lambda: open("/dev/zero", "rb").close()),
        "urandom_r": len(read_n("/dev/urandom", 8)),
        "urandom_w": attempt(lambda: write("/dev/urandom")),
        "shell_redirect": subprocess.run(["/bin/sh", "-c", "echo hi > /dev/null"]).returncode,
    })
    assert res["null_w"] == "ok" and res["zero_r"] == "ok" and res["urandom_r"] == 8
    assert res["urandom_w"] == "EACCES"        # control: root may write /dev/urandom without Landlock
    assert res["shell_redirect"] == 0          # O_TRUNC on a device needs no truncate right
    write("/dev/urandom", b"\0")


def read_n(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


# --- apply() failures -------------------------------------------------------------------------
def test_missing_required_path_is_a_launch_error(tree: Path):
    missing = str(tree / "gone")
    plan = make_plan(tree)
    fs = FilesystemPlan(binds=plan.filesystem.binds + (Bind(missing, missing),),
                        work_dir=plan.filesystem.work_dir)
    prepared = ll.prepare(ll.resolve(Plan(argv=("x",), filesystem=fs), ABI))

    def child():
        set_nnp()
        try:
            ll.apply(prepared)
        except LaunchError as e:
            # Nothing was restricted: the secret is still readable.
            return {"err": e.to_dict(), "text": str(e),
                    "secret": attempt(lambda: read(tree / "secret" / "secret.txt"))}
        return {"err": None}
    res = in_child(child)
    assert res["err"]["kind"] == "LaunchError" and res["err"]["step"] == "landlock"
    assert res["err"]["path"] == missing and res["err"]["errno"] == errno.ENOENT
    assert res["text"].startswith(f"landlock: rule path missing in the new root [{missing}] (ENOENT")
    assert res["secret"] == "ok"


def test_missing_optional_path_is_skipped(tree: Path):
    missing = str(tree / "maybe")
    plan = make_plan(tree)
    fs = FilesystemPlan(binds=plan.filesystem.binds + (Bind(missing, missing, optional=True),),
                        work_dir=plan.filesystem.work_dir)
    res = sandboxed(Plan(argv=("x",), filesystem=fs), lambda _: {})
    assert missing in res["att"]["skipped_optional"]


def test_apply_refuses_without_no_new_privs(tree: Path):
    prepared = ll.prepare(ll.resolve(make_plan(tree), ABI))

    def child():
        try:
            ll.apply(prepared)
        except LaunchError as e:
            return {"text": str(e), "secret": attempt(lambda: read(tree / "secret" / "secret.txt"))}
        return {"text": None}
    res = in_child(child)
    assert res["text"] == ("landlock: no_new_privs is not set; hint: call set_no_new_privs() "
                           "before landlock.apply()")
    assert res["secret"] == "ok"


def test_attestation(tree: Path):
    rules = ll.resolve(make_plan(tree, tcp_connect=(443,)), ABI)
    att = sandboxed(make_plan(tree, tcp_connect=(443,)), lambda _: {})["att"]
    assert att["enabled"] is True and att["mode"] == "required"
    assert att["abi"] == min(ABI, ll.KNOWN_ABI) and att["host_abi"] == ABI
    assert att["handled_access_fs"] == ll.fs_names(ll.handled_fs_for(att["abi"]))
    assert "execute" in att["handled_access_fs"] and "read_file" in att["handled_access_fs"]
    if ABI >= 6:
        assert att["handled_access_net"] == ["bind_tcp", "connect_tcp"]
        assert att["scoped"] == ["abstract_unix_socket", "signal"]
        assert att["unenforced"] == []
    skipped = len(att["skipped_optional"])
    assert att["path_rules"] == len(rules.paths) - skipped and att["net_rules"] == len(rules.ports)
    json.dumps(att)                        # crosses the sync socket as JSON


# --- TCP --------------------------------------------------------------------------------------
def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def _bind(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@needs_net
def test_tcp_connect_and_bind_only_to_planned_ports(tree: Path):
    allowed, other = _listener(), _listener()
    try:
        a_port, o_port = allowed.getsockname()[1], other.getsockname()[1]
        b_ok, b_no = _free_port(), _free_port()
        _connect(o_port)                                        # control: reachable without Landlock
        other.accept()[0].close()
        res = sandboxed(make_plan(tree, tcp_connect=(a_port,), tcp_bind=(b_ok,)), lambda _: {
            "connect_allowed": attempt(lambda: _connect(a_port)),
            "connect_other": attempt(lambda: _connect(o_port)),
            "bind_allowed": attempt(lambda: _bind(b_ok)),
            "bind_other": attempt(lambda: _bind(b_no)),
        })
        assert without_att(res) == {"connect_allowed": "ok", "connect_other": "EACCES",
                       "bind_allowed": "ok", "bind_other": "EACCES"}
    finally:
        allowed.close()
        other.close()


# --- scope: signals and abstract unix sockets ---------------------------------------------------
@needs_scope
def test_signals_stay_inside_the_domain(tree: Path):
    victim = os.fork()
    if victim == 0:
        time.sleep(60)
        os._exit(0)
    try:
        def probe(_):
            own = os.fork()
            if own == 0:
                time.sleep(60)
                os._exit(0)
            own_kill = attempt(lambda: os.kill(own, signal.SIGKILL))
            _, status = os.waitpid(own, 0)
            return {"probe": attempt(lambda: os.kill(victim, 0)),
                    "term": attempt(lambda: os.kill(victim, signal.SIGTERM)),
                    "own": own_kill, "own_signaled": os.WIFSIGNALED(status)}
        res = sandboxed(make_plan(tree), probe)
        assert res["probe"] == "EPERM" and res["term"] == "EPERM"
        assert res["own"] == "ok" and res["own_signaled"]
        assert os.waitpid(victim, os.WNOHANG) == (0, 0)          # the victim never got SIGTERM
        # Control: without scoping, the same child may signal the victim.
        res = sandboxed(make_plan(tree, scope=False), lambda _: {"probe": attempt(lambda: os.kill(victim, 0))})
        assert res["probe"] == "ok"
    finally:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)


@needs_scope
def test_abstract_unix_sockets_outside_the_domain_are_unreachable(tree: Path):
    name = f"\0sandboxd-landlock-test-{os.getpid()}"
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(name)
    outside.listen(4)

    def connect(addr: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(addr)

    def probe(_):
        inside_name = name + "-inside"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as inside:
            inside.bind(inside_name)
            inside.listen(1)
            return {"outside": attempt(lambda: connect(name)),
                    "inside": attempt(lambda: connect(inside_name))}
    try:
        res = sandboxed(make_plan(tree), probe)
        assert without_att(res) == {"outside": "EPERM", "inside": "ok"}
        res = sandboxed(make_plan(tree, scope=False), lambda _: {"outside": attempt(lambda: connect(name))})
        assert res["outside"] == "ok"                              # control
    finally:
        outside.close()
