"""Service building blocks on their own: admission, work directories (real tmpfs), recovery,
metrics, audit, the error table, auth parsing."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import grpc
import pytest

from tests.api_helpers import remove_tree, short_tmp
from tests.conftest import need_root
from sandboxd.api.auth import Authenticator, Unauthenticated, peer_address_name, token_hash
from sandboxd.api.errors import STATUS_TABLE, status_for
from sandboxd.engine.admission import Admission, Cancelled, ShuttingDown
from sandboxd.engine.audit import AuditLog
from sandboxd.engine.config import parse_config
from sandboxd.engine.metrics import Metrics
from sandboxd.engine.recovery import StateLock, recover
from sandboxd.engine.workdir import WorkDirs, link_files, mount_points, read_output, write_files
from sandboxd.errors import (LaunchError, PermissionDenied, PolicyError, ResourceExhausted,
                             SandboxError)
from sandboxd.policy.request import InputFile, RequestError


# -- admission ---------------------------------------------------------------------------------
def _bg(fn, *a):
    out = {}

    def run():
        try:
            out["v"] = fn(*a)
        except BaseException as e:
            out["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_admission_global_and_tenant_limits_and_queue_bound():
    adm = Admission(max_running=2, max_queued=1)
    a1 = adm.acquire("a", 1, 5)
    # tenant a is at its own limit: a second run of a waits (queue), b still runs at once
    t, out = _bg(adm.acquire, "a", 1, 5)
    time.sleep(0.1)
    assert adm.snapshot().queued == 1 and "v" not in out
    b1 = adm.acquire("b", 5, 5)
    # global limit reached and queue full: refused at once, naming the bound
    with pytest.raises(ResourceExhausted) as ei:
        adm.acquire("c", 5, 5)
    assert "max_queued 1" in str(ei.value)
    a1.release()
    t.join(2)
    assert "v" in out and adm.snapshot().running == 2
    out["v"].release()
    b1.release()
    assert adm.snapshot().running == 0


def test_admission_per_tenant_queue_bound():
    adm = Admission(max_running=1, max_queued=10)
    s = adm.acquire("a", 1, 1)
    t, out = _bg(adm.acquire, "a", 1, 1)
    time.sleep(0.05)
    with pytest.raises(ResourceExhausted) as ei:
        adm.acquire("a", 1, 1)
    assert "concurrency.max_queued 1" in str(ei.value)
    s.release()
    t.join(2)
    out["v"].release()


def test_admission_is_fifo_and_a_blocked_tenant_does_not_block_others():
    adm = Admission(max_running=1, max_queued=10)
    first = adm.acquire("a", 1, 10)
    order = []

    def worker(name, tenant):
        s = adm.acquire(tenant, 1, 10)
        order.append(name)
        time.sleep(0.02)
        s.release()
    ts = []
    for i, tenant in enumerate(["a", "b", "c"]):
        t = threading.Thread(target=worker, args=(f"{tenant}{i}", tenant))
        t.start()
        ts.append(t)
        time.sleep(0.05)
    first.release()
    for t in ts:
        t.join(3)
    assert order == ["a0", "b1", "c2"]


def test_admission_cancel_deadline_and_shutdown_wake_waiters():
    adm = Admission(max_running=1, max_queued=10)
    s = adm.acquire("a", 1, 10)
    ev = threading.Event()
    t, out = _bg(adm.acquire, "b", 1, 10, ev)
    time.sleep(0.05)
    ev.set()
    adm.kick()
    t.join(2)
    assert isinstance(out.get("e"), Cancelled)
    with pytest.raises(Cancelled):
        adm.acquire("b", 1, 10, None, time.monotonic() + 0.05)
    t, out = _bg(adm.acquire, "b", 1, 10)
    time.sleep(0.05)
    adm.close()
    t.join(2)
    assert isinstance(out.get("e"), ShuttingDown)
    assert adm.snapshot().queued == 0
    s.release()


# -- work directories (real tmpfs) -------------------------------------------------------------
@pytest.fixture
def workdirs():
    need_root()
    base = short_tmp()
    wd = WorkDirs(os.path.join(base, "work"), use_tmpfs=True)
    wd.prepare()
    yield wd
    wd.release()
    remove_tree(base)


def test_work_dir_is_a_capped_tmpfs_and_vanishes(workdirs):
    w = workdirs.create("run1", 1 << 20)
    assert w.top in mount_points()
    box = w.subdir("box")
    assert oct(os.stat(box).st_mode & 0o7777) == "0o700"
    write_files(box, [InputFile("a.txt", b"hello", 0o600), InputFile("d/e/f.bin", b"\0" * 10, 0o755)])
    assert open(os.path.join(box, "a.txt"), "rb").read() == b"hello"
    assert os.stat(os.path.join(box, "a.txt")).st_mode & 0o777 == 0o600
    assert os.stat(os.path.join(box, "d", "e", "f.bin")).st_mode & 0o777 == 0o755
    # The cap is real: writing past it fails with ENOSPC.
    with pytest.raises(OSError) as ei:
        with open(os.path.join(box, "big"), "wb") as f:
            f.write(b"x" * (2 << 20))
            f.flush()
    assert ei.value.errno == errno.ENOSPC
    w.close()
    assert w.top not in mount_points() and not os.path.exists(w.top)


def test_outputs_never_follow_symlinks_or_block_on_fifos(workdirs, tmp_path):
    w = workdirs.create("run2", 1 << 20)
    box = w.subdir("box")
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    os.symlink(str(secret), os.path.join(box, "link"))
    os.mkdir(os.path.join(box, "sub"))
    os.symlink(str(tmp_path), os.path.join(box, "dirlink"))
    os.mkfifo(os.path.join(box, "fifo"))
    with open(os.path.join(box, "out.txt"), "wb") as f:
        f.write(b"0123456789")
    assert read_output(box, "link", 100).error == "symlink (not followed)"
    assert read_output(box, "dirlink/secret", 100).error == \
        "a parent is a symlink or not a directory (not followed)"
    assert read_output(box, "fifo", 100).error == "not a regular file"
    assert read_output(box, "sub", 100).error == "not a regular file"
    assert read_output(box, "nope", 100).error == "missing"
    r = read_output(box, "out.txt", 4)
    assert (r.content, r.size_bytes, r.truncated) == (b"0123", 10, True)
    w.close()


def test_shared_batch_files_are_hard_links_a_case_cannot_change(workdirs):
    w = workdirs.create("batch", 1 << 20)
    shared = w.subdir("shared")
    write_files(shared, [InputFile("prog", b"#!/bin/sh\n", 0o777), InputFile("lib/x", b"x")],
                mode_mask=0o755)
    case = w.subdir("case-0")
    link_files(shared, case, ["prog", "lib/x"])
    st1, st2 = os.stat(os.path.join(shared, "prog")), os.stat(os.path.join(case, "prog"))
    assert st1.st_ino == st2.st_ino and st2.st_mode & 0o777 == 0o755   # group/other: no write
    assert os.stat(os.path.join(case, "lib", "x")).st_nlink == 2
    w.close()


def test_recovery_removes_leftover_mounts_and_dirs_and_the_lock_is_exclusive():
    need_root()
    base = short_tmp()
    state = os.path.join(base, "state")
    wd = WorkDirs(os.path.join(state, "work"), use_tmpfs=True)
    wd.prepare()
    w = wd.create("leftover", 1 << 20)
    write_files(w.subdir("box"), [InputFile("f", b"x")])
    os.makedirs(os.path.join(state, "work", "plain-leftover", "x"))
    os.makedirs(os.path.join(state, "private", "peers"))
    lock = StateLock(state)
    with pytest.raises(SandboxError) as ei:
        StateLock(state)
    assert "another sandboxd is running" in str(ei.value)
    actions = recover(state)
    assert f"unmounted {w.top}" in actions
    assert os.listdir(os.path.join(state, "work")) == []
    assert not os.path.exists(os.path.join(state, "private"))
    assert w.top not in mount_points()
    lock.release()
    wd.release()
    remove_tree(base)


def test_work_root_must_be_searchable_by_sandbox_uids(tmp_path):
    need_root()
    os.chmod(tmp_path, 0o700)
    with pytest.raises(SandboxError) as ei:
        WorkDirs(str(tmp_path / "work"), use_tmpfs=False).prepare()
    assert ei.value.path == str(tmp_path) and "chmod o+x" in str(ei.value)


# -- metrics, audit, errors, auth ----------------------------------------------------------------
def test_metrics_text_format():
    m = Metrics(running=lambda: 3, queued=lambda: 7)
    m.runs.inc("alice", "OK")
    m.runs.inc("alice", "OK")
    m.kills.inc("bob", "wall time")
    m.latency.observe(0.03, "Execute")
    text = m.render()
    assert 'sandboxd_runs_total{tenant="alice",status="OK"} 2' in text
    assert 'sandboxd_sandbox_kills_total{tenant="bob",reason="wall time"} 1' in text
    assert 'sandboxd_request_duration_seconds_bucket{method="Execute",le="0.05"} 1' in text
    assert 'sandboxd_request_duration_seconds_bucket{method="Execute",le="0.025"} 0' in text
    assert "sandboxd_queue_depth 7" in text and "sandboxd_running 3" in text
    assert "# TYPE sandboxd_request_duration_seconds histogram" in text


def test_audit_lines_are_json_and_not_world_readable(tmp_path):
    p = str(tmp_path / "log" / "audit.jsonl")
    a = AuditLog(p)
    threads = [threading.Thread(target=a.write, args=("run",), kwargs={"n": i, "argv": ["x"] * 50})
               for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    lines = open(p).read().splitlines()
    assert sorted(json.loads(x)["n"] for x in lines) == list(range(50))
    assert os.stat(p).st_mode & 0o777 == 0o640


def test_error_table_order_and_mapping():
    assert status_for(RequestError("f", "x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(ResourceExhausted("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(Unauthenticated("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_for(PolicyError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(LaunchError("x")) == grpc.StatusCode.INTERNAL
    assert status_for(ValueError("x")) == grpc.StatusCode.INTERNAL
    # every class appears after all of its subclasses, so the most specific one decides
    classes = [c for c, _ in STATUS_TABLE]
    for i, c in enumerate(classes):
        assert not any(issubclass(later, c) and later is not c for later in classes[i + 1:])


class _Ctx:
    def __init__(self, peer="", md=(), auth=None):
        self._peer, self._md, self._auth = peer, md, auth or {}

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._md

    def auth_context(self):
        return self._auth


def test_authenticator_sources(tmp_path):
    tok = "s3cret"
    cfg = parse_config(f"""version: 1
tenants:
  alice: {{unix_uids: [1000]}}
  bob: {{token_sha256: ["{token_hash(tok)}"]}}
  web: {{tls_identities: [web-client]}}
""", "c.yaml", str(tmp_path))
    peers = str(tmp_path / "peers")
    auth = Authenticator(lambda: cfg, peers)
    p = os.path.join(peers, peer_address_name(1000, 1000, 42))
    assert auth.identify(_Ctx(f"unix:{p}")).tenant == "alice"
    with pytest.raises(Unauthenticated, match="uid 5 is not a tenant"):
        auth.identify(_Ctx(f"unix:{os.path.join(peers, peer_address_name(5, 5, 1))}"))
    # a unix peer outside the private peer directory is not trusted, whatever its name says
    with pytest.raises(Unauthenticated, match="not identified"):
        auth.identify(_Ctx(f"unix:/tmp/{peer_address_name(1000, 1000, 1)}"))
    with pytest.raises(Unauthenticated, match="not identified"):
        auth.identify(_Ctx("unix:"))
    assert auth.identify(_Ctx("unix:", (("authorization", f"Bearer {tok}"),))).tenant == "bob"
    # a wrong token is refused even on a connection that would identify someone
    with pytest.raises(Unauthenticated, match="matches no tenant"):
        auth.identify(_Ctx(f"unix:{p}", (("authorization", "Bearer nope"),)))
    with pytest.raises(Unauthenticated, match="Bearer <token>"):
        auth.identify(_Ctx("unix:", (("authorization", "Basic abc"),)))
    ssl = {"transport_security_type": [b"ssl"], "x509_common_name": [b"web-client"]}
    assert auth.identify(_Ctx("ipv4:1.2.3.4:5", (), ssl)).tenant == "web"
    with pytest.raises(Unauthenticated, match="is not a tenant"):
        auth.identify(_Ctx("ipv4:1.2.3.4:5", (), {"transport_security_type": [b"ssl"],
                                                  "x509_common_name": [b"eve"]}))
    with pytest.raises(Unauthenticated, match="no credentials"):
        auth.identify(_Ctx("ipv4:1.2.3.4:5"))
