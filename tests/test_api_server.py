"""The gRPC service through a real server: unix socket (SO_PEERCRED) and TLS (mTLS, certificates
made here), every RPC, authentication and authorization failures, hostile requests, concurrency,
cancellation and deadlines, reload on SIGHUP, graceful shutdown and crash recovery.

The sandbox underneath is tests/api_helpers.FakeRuntime, so these tests are about the service
layer; tests/test_api_e2e.py repeats the essentials over the real runtime.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxd.api.auth import token_hash
from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
from sandboxd.client import TLS, Client, ClientError, make_request
from sandboxd.engine.workdir import mount_points
from tests.api_helpers import (ROOT, FakeRuntime, audit_records, make_pki, remove_tree,
                               short_tmp, spawn_server, start_server, wait_for, wait_serving,
                               work_entries, write_config)
from tests.conftest import need_root

TOKEN = "bob-secret-token"


@pytest.fixture
def env():
    need_root()   # the server mounts a tmpfs per work directory
    base = short_tmp()
    paths = write_config(base, token_sha256=token_hash(TOKEN))
    rt = FakeRuntime()
    srv = start_server(paths, rt)
    c = Client(socket=paths.socket, timeout=30)
    yield SimpleNamespace(paths=paths, rt=rt, srv=srv, client=c)
    c.close()
    srv.stop(0.5)
    remove_tree(base)


def code_of(fn, *a, **kw) -> tuple[grpc.StatusCode, ClientError]:
    with pytest.raises(ClientError) as ei:
        fn(*a, **kw)
    return ei.value.code, ei.value


# -- each RPC ------------------------------------------------------------------------------------
def test_execute_returns_the_result_and_the_decision(env):
    r = env.client.execute(["/bin/echo", "hello"], labels={"submission": "42"})
    assert r.result.status == pb.STATUS_OK and r.result.stdout == b"hello\n"
    assert r.result.exit_code == 0 and len(r.run_id) == 32
    assert r.decision.allowed and r.decision.tenant == "alice" and r.decision.policy == "svc"
    assert r.result.attestation["fake"] is True
    plan = env.rt.plans[-1]
    assert plan.run_id == r.run_id and plan.limits.memory_bytes == 64 << 20
    rec = audit_records(env.paths, "run")[-1]
    assert rec["run_id"] == r.run_id and rec["tenant"] == "alice" and rec["auth"] == "unix_peer"
    assert rec["labels"] == {"submission": "42"} and rec["outcome"]["status"] == "OK"
    assert rec["peer"].startswith("unix uid=0 ")


def test_files_in_and_out_and_nothing_left_behind(env):
    r = env.client.execute(["/bin/cp", "in/data.txt", "out.txt"],
                           files=[("in/data.txt", b"payload", 0o640), ("run.sh", b"#!/bin/sh\n", 0o755)],
                           output_files=["out.txt", "missing.txt"])
    assert r.result.status == pb.STATUS_OK
    out, missing = r.result.files
    assert (out.name, out.content, out.size_bytes, out.error) == ("out.txt", b"payload", 7, "")
    assert missing.error == "missing"
    plan = env.rt.plans[-1]
    assert plan.filesystem.work_host_path.startswith(env.paths.state_dir)
    assert work_entries(env.paths) == []   # the run's tmpfs is gone
    rec = audit_records(env.paths, "run")[-1]
    assert {f["name"] for f in rec["files"]} == {"in/data.txt", "run.sh"}
    assert all(len(f["sha256"]) == 64 for f in rec["files"])


def test_output_symlinks_are_not_followed(env):
    r = env.client.execute(["/bin/ln", "-s", "/etc/shadow", "out"], output_files=["out"])
    assert r.result.files[0].error == "symlink (not followed)" and r.result.files[0].content == b""


def test_execute_stream_streams_stdin_and_output(env):
    start = make_request(["/bin/cat"])
    chunks = [b"one\n", b"two\n", b"three\n"]
    msgs = list(env.client.execute_stream(start, iter(chunks)))
    kinds = [m.WhichOneof("kind") for m in msgs]
    assert kinds[0] == "started" and kinds[-1] == "result"
    assert b"".join(m.stdout for m in msgs if m.WhichOneof("kind") == "stdout") == b"one\ntwo\nthree\n"
    res = msgs[-1].result
    assert res.result.status == pb.STATUS_OK and res.result.stdout == b""   # it was streamed
    assert res.run_id == msgs[0].started.run_id


def test_execute_stream_refuses_a_stream_without_start(env):
    ch = env.client.channel.stream_stream("/sandboxd.v1.Sandbox/ExecuteStream")
    reqs = iter([pb.ExecuteStreamRequest(stdin=b"x").SerializeToString()])
    with pytest.raises(grpc.RpcError) as ei:
        list(ch(reqs, timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be `start`" in ei.value.details()


def test_execute_batch_shares_files_and_gives_each_case_its_own_result(env):
    prog = make_request(["/bin/cat"], files=[("prog.py", b"print(1)\n", 0o755)],
                        output_files=["prog.py"])
    cases = [pb.BatchCase(name="t1", stdin=b"a"), pb.BatchCase(name="t2", stdin=b"bb"),
             pb.BatchCase(name="t3", limits=pb.Limits(cpu_time_ms=2000)),
             pb.BatchCase(name="t4", files=[pb.InputFile(name="case.txt", content=b"c")])]
    r = env.client.execute_batch(prog, cases)
    assert [c.name for c in r.cases] == ["t1", "t2", "t3", "t4"]
    assert [c.result.stdout for c in r.cases] == [b"a", b"bb", b"", b""]
    assert all(c.result.files[0].content == b"print(1)\n" for c in r.cases)
    plans = env.rt.plans[-4:]
    assert [p.limits.cpu_time_ms for p in plans] == [1000, 1000, 2000, 1000]
    assert len({p.run_id for p in plans}) == 4
    assert all(p.filesystem.work_host_path.endswith(f"/case-{i}") for i, p in enumerate(plans))
    assert work_entries(env.paths) == []


def test_execute_batch_stop_on_failure_and_limits_checked_first(env):
    prog = make_request(["/bin/false"])
    r = env.client.execute_batch(prog, [pb.BatchCase(name="a"), pb.BatchCase(name="b")],
                                 stop_on_failure=True)
    assert r.cases[0].result.status == pb.STATUS_RUNTIME_ERROR and r.cases[1].skipped
    n = len(env.rt.plans)
    code, e = code_of(env.client.execute_batch, make_request(["/bin/true"]),
                      [pb.BatchCase(name="ok"), pb.BatchCase(name="big", limits=pb.Limits(cpu_time_ms=10**6))])
    assert code == grpc.StatusCode.PERMISSION_DENIED and e.details["field"] == "cases[1].limits.cpu_time_ms"
    assert len(env.rt.plans) == n   # refused whole, before any case ran


def test_explain_allowed_and_denied(env):
    r = env.client.explain(["/bin/true"], limits={"memory_bytes": 128 << 20})
    assert r.decision.allowed and "limits.memory_bytes=134217728 (asked; max 268435456)" in r.decision.notes
    plan = json.loads(r.plan_json)
    assert plan["limits"]["memory_bytes"] == 128 << 20 and plan["seccomp"]["name"] == "default"
    r = env.client.explain(["/bin/true"], limits={"memory_bytes": 1 << 30})
    assert not r.decision.allowed and r.plan_json == ""
    assert r.decision.denied_field == "limits.memory_bytes"
    assert r.decision.reason == "asked 1073741824, policy 'svc' allows at most 268435456"
    assert env.rt.plans == []   # nothing ran


def test_validate_policy(env):
    good = "version: 1\nname: new\ntenants: [alice]\nseccomp: {default: judge}\n"
    r = env.client.validate_policy({"new.yaml": good})
    assert r.ok and list(r.policies) == ["new"]
    bad = good + "capabilities: [CAP_BOGUS]\nlimits: {pids: {default: 5, max: 2}}\n"
    r = env.client.validate_policy({"bad.yaml": bad, "worse.yaml": "tenants: [eve]\n"})
    assert not r.ok
    got = [(p.file, p.line, p.key_path) for p in r.problems]
    assert ("bad.yaml", 5, "capabilities[0]") in got and ("bad.yaml", 6, "limits.pids.default") in got
    assert ("worse.yaml", 1, "tenants[0]") in got   # unknown tenant, checked against the server
    assert any(p.key_path == "version" and p.file == "worse.yaml" for p in r.problems)


def test_host_info_health_and_reflection(env):
    r = env.client.host_info()
    assert r.info["fake"] is True and r.server_version
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    h = health_pb2_grpc.HealthStub(env.client.channel)
    assert h.Check(health_pb2.HealthCheckRequest(service="sandboxd.v1.Sandbox")).status == \
        health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(env.client.channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"sandboxd.v1.Sandbox", "grpc.health.v1.Health"} <= names


# -- authentication ------------------------------------------------------------------------------
def test_bearer_tokens(env):
    with Client(socket=env.paths.socket, token=TOKEN) as c:
        r = c.explain(["/bin/true"], policy="svc")
        assert r.decision.tenant == "bob"
    with Client(socket=env.paths.socket, token="wrong") as c:
        code, e = code_of(c.execute, ["/bin/true"])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token matches no tenant" in e.message
    md = (("authorization", "Basic Ym9i"),)
    with pytest.raises(grpc.RpcError) as ei:
        env.client.stub.HostInfo(pb.HostInfoRequest(), metadata=md)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


_AS_UID = """
import os, sys, json
os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
sys.path.insert(0, {root!r})
from sandboxd.client import Client, ClientError
try:
    r = Client(socket=sys.argv[1], timeout=10).explain(["/bin/true"])
    print(json.dumps({{"tenant": r.decision.tenant}}))
except ClientError as e:
    print(json.dumps({{"code": e.code.name, "message": e.message}}))
"""


def _call_as(uid: int, sock: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _AS_UID.format(root=ROOT), sock, str(uid)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_unix_peer_uid_maps_to_a_tenant_or_is_refused():
    need_root()
    base = short_tmp()
    os.chmod(base, 0o755)
    try:
        paths = write_config(base, unix_mode=0o666,
                             extra_tenants="carol: {unix_uids: [4242], default_policy: svc}\n",
                             policies={"svc.yaml": "version: 1\nname: svc\ntenants: [alice, carol]\n"
                                                   "seccomp: {default: default}\n"})
        srv = start_server(paths)
        try:
            assert _call_as(4242, paths.socket) == {"tenant": "carol"}
            got = _call_as(4343, paths.socket)
            assert got["code"] == "UNAUTHENTICATED" and "unix peer uid 4343 is not a tenant" in got["message"]
        finally:
            srv.stop(0.5)
    finally:
        remove_tree(base)


def test_direct_connection_to_the_internal_socket_is_not_trusted(env):
    internal = os.path.join(env.paths.state_dir, "private", "grpc.sock")
    assert os.stat(os.path.dirname(internal)).st_mode & 0o777 == 0o700
    with Client(socket=internal) as c:
        code, e = code_of(c.execute, ["/bin/true"])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not identified" in e.message


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def tls_env(pki):
    need_root()
    base = short_tmp()
    paths = write_config(base, token_sha256=token_hash(TOKEN), tcp={
        "address": "127.0.0.1:0", "cert": pki["server"], "key": pki["server_key"],
        "client_ca": pki["ca"]})
    srv = start_server(paths)
    yield SimpleNamespace(paths=paths, srv=srv, target=f"localhost:{srv.tcp_port}")
    srv.stop(0.5)
    remove_tree(base)


def test_mtls_client_certificate_names_the_tenant(tls_env, pki):
    for who in ("web", "web_uri"):   # CN web-client, or URI SAN spiffe://test/web
        with Client(tls_env.target, tls=TLS(pki["ca"], pki[who], pki[f"{who}_key"]), timeout=10) as c:
            r = c.execute(["/bin/echo", "over tls"])
            assert r.decision.tenant == "web" and r.result.stdout == b"over tls\n"
    rec = audit_records(tls_env.paths, "run")[-1]
    assert rec["auth"] == "tls" and "spiffe://test/web" in rec["peer"]


def test_mtls_failures(tls_env, pki):
    with Client(tls_env.target, tls=TLS(pki["ca"], pki["stranger"], pki["stranger_key"]), timeout=10) as c:
        code, e = code_of(c.execute, ["/bin/true"])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "stranger is not a tenant" in e.message
    # No client certificate, a certificate from another CA, or a client that does not trust the
    # server: the TLS handshake itself fails, so no RPC is ever seen (UNAVAILABLE).
    for tls in (TLS(pki["ca"]), TLS(pki["ca"], pki["forged"], pki["forged_key"]),
                TLS(pki["other_ca"], pki["web"], pki["web_key"])):
        with Client(tls_env.target, tls=tls, timeout=5) as c:
            code, _ = code_of(c.host_info)
            assert code == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates_needs_a_token(pki):
    need_root()
    base = short_tmp()
    paths = write_config(base, token_sha256=token_hash(TOKEN), unix=False, tcp={
        "address": "127.0.0.1:0", "cert": pki["server"], "key": pki["server_key"],
        "require_client_cert": "false"})
    srv = start_server(paths)
    try:
        target = f"localhost:{srv.tcp_port}"
        with Client(target, tls=TLS(pki["ca"]), timeout=10) as c:
            code, e = code_of(c.host_info)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "send a bearer token" in e.message
        with Client(target, tls=TLS(pki["ca"]), token=TOKEN, timeout=10) as c:
            assert c.explain(["/bin/true"], policy="svc").decision.tenant == "bob"
    finally:
        srv.stop(0.5)
        remove_tree(base)


# -- authorization ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field,text", [
    ({"policy": "nope"}, "policy", "policy 'nope' does not apply to tenant 'alice'"),
    ({"limits": {"memory_bytes": 1 << 30}}, "limits.memory_bytes", "allows at most 268435456"),
    ({"network": "host"}, "network", "mode 'host' is not allowed by policy 'svc' (allowed: none)"),
    ({"binds": [("/etc", "/data/etc", False)]}, "binds[0]", "is outside what policy 'svc' allows"),
    ({"seccomp_profile": "unconfined"}, "seccomp_profile", "profile 'unconfined' is not allowed"),
    ({"env": {"LD_PRELOAD": "/x"}}, "env.LD_PRELOAD", "not allowed by policy 'svc'"),
])
def test_authorization_failures_name_field_and_bound(env, kw, field, text):
    code, e = code_of(env.client.execute, ["/bin/true"], **kw)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert e.details["kind"] == "PermissionDenied" and e.details["field"] == field
    assert text in e.message
    assert env.rt.plans == []
    assert audit_records(env.paths, "rejected")[-1]["error"]["message"].startswith(field)


def test_policy_for_another_tenant_is_denied(env):
    with Client(socket=env.paths.socket, token=TOKEN) as c:
        code, e = code_of(c.execute, ["/bin/true"], policy="lab")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "(its policies: svc)" in e.message


def test_allowed_bind_is_granted(env):
    r = env.client.execute(["/bin/true"], binds=[(os.path.join(env.paths.data, "dataset.txt"),
                                                  "/data/dataset.txt", False)])
    assert r.result.status == pb.STATUS_OK
    assert env.rt.plans[-1].filesystem.binds[-1].target == "/data/dataset.txt"


# -- hostile requests ------------------------------------------------------------------------------
def test_malformed_bytes_and_oversized_messages(env):
    raw = env.client.channel.unary_unary("/sandboxd.v1.Sandbox/Execute")
    with pytest.raises(grpc.RpcError) as ei:
        raw(b"\xff\xff\xff\xff\x0f", timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ExecuteRequest message" in ei.value.details()
    code, e = code_of(env.client.execute, ["/bin/true"], stdin=b"x" * (65 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED   # above max_message_bytes, refused by gRPC
    code, e = code_of(env.client.execute, ["x"] * 100_000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and e.details["field"] == "argv"


_t = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\ud800"), max_size=30)
_name = st.one_of(_t, st.sampled_from(["../x", "/etc/passwd", "a/../../b", "ok", "a\0b", ".",
                                       "dir/ok.txt", "\x1b[31m", "x" * 400]))
_i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@st.composite
def hostile_request(draw):
    m = pb.ExecuteRequest(argv=draw(st.lists(_t, max_size=4)), cwd=draw(st.one_of(st.just(""), _t)),
                          policy=draw(st.one_of(st.just(""), _t)),
                          seccomp_profile=draw(st.one_of(st.just(""), _t)),
                          network=draw(st.one_of(st.just(""), st.sampled_from(["none", "host"]), _t)),
                          output_files=draw(st.lists(_name, max_size=3)))
    for name in draw(st.lists(_name, max_size=3)):
        m.files.append(pb.InputFile(name=name, content=draw(st.binary(max_size=16)),
                                    mode=draw(st.integers(min_value=0, max_value=(1 << 32) - 1))))
    for k, v in draw(st.lists(st.tuples(_t, _t), max_size=2)):
        m.env.append(pb.EnvVar(name=k, value=v))
    for field in draw(st.lists(st.sampled_from(["cpu_time_ms", "wall_time_ms", "memory_bytes", "pids",
                                                "stdout_bytes", "open_files"]), max_size=3)):
        setattr(m.limits, field, draw(_i64))
    if draw(st.booleans()):
        m.limits.cpu_quota = draw(st.floats(allow_nan=True, allow_infinity=True))
    for k, v in draw(st.dictionaries(_t, _t, max_size=2)).items():
        m.labels[k] = v
    for s, t in draw(st.lists(st.tuples(_name, _name), max_size=2)):
        m.binds.append(pb.BindRequest(source=s, target=t))
    return m


def test_fuzzed_requests_get_clear_errors_and_leave_nothing_behind(env):
    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(m=hostile_request())
    def check(m):
        try:
            r = env.client.execute(m)
        except ClientError as e:
            assert e.code in allowed, (e.code, e.message)
            assert e.details.get("kind") in ("RequestError", "PermissionDenied") and e.message
        else:
            assert r.result.status != pb.STATUS_UNSPECIFIED
        assert work_entries(env.paths) == []
    check()
    assert not any(m.startswith(env.paths.state_dir + "/work/") for m in mount_points())


# -- concurrency ------------------------------------------------------------------------------------
def test_fifty_concurrent_executes(env):
    def one(i):
        return env.client.execute(["/bin/sleep", "0.05"], labels={"i": str(i)}).result.status
    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        statuses = list(ex.map(one, range(50)))
    assert statuses == [pb.STATUS_OK] * 50
    assert 1 < env.rt.max_running <= 4   # the global max_running of the test config
    assert len(audit_records(env.paths, "run")) == 50


def test_queue_full_is_resource_exhausted():
    need_root()
    base = short_tmp()
    paths = write_config(base, max_running=1, max_queued=1)
    rt = FakeRuntime()
    srv = start_server(paths, rt)
    try:
        with Client(socket=paths.socket, timeout=30) as c:
            f1 = c.execute_future(make_request(["/bin/sleep", "1"]))
            wait_for(lambda: rt.running == 1, what="first run")
            f2 = c.execute_future(make_request(["/bin/sleep", "0"]))
            wait_for(lambda: srv.core.admission.snapshot().queued == 1, what="queued")
            code, e = code_of(c.execute, ["/bin/true"])
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued 1" in e.message
            assert f1.result().result.status == pb.STATUS_OK and f2.result().result.status == pb.STATUS_OK
            text = srv.core.metrics.render()
            assert 'sandboxd_rejections_total{tenant="alice",kind="ResourceExhausted"} 1' in text
    finally:
        srv.stop(0.5)
        remove_tree(base)


# -- cancellation and deadlines ----------------------------------------------------------------
def test_cancel_kills_the_run(env):
    fut = env.client.execute_future(make_request(["/bin/sleep", "30"], files=[("f", b"x")]))
    assert env.rt.started.wait(5)
    t0 = time.monotonic()
    fut.cancel()
    wait_for(lambda: env.rt.running == 0, 3, "the run to end")
    assert time.monotonic() - t0 < 2
    rec = wait_for(lambda: audit_records(env.paths, "run"), 3, "audit")[-1]
    assert rec["outcome"]["status"] == "CANCELLED"
    wait_for(lambda: work_entries(env.paths) == [], 3, "work dir removal")


def test_deadline_kills_the_run(env):
    t0 = time.monotonic()
    code, _ = code_of(env.client.execute, ["/bin/sleep", "30"], timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: env.rt.running == 0, 3, "the run to end")
    assert time.monotonic() - t0 < 3
    rec = wait_for(lambda: audit_records(env.paths, "run"), 3, "audit")[-1]
    assert rec["outcome"]["status"] == "CANCELLED"


def test_cancel_while_queued_leaves_the_queue():
    need_root()
    base = short_tmp()
    paths = write_config(base, max_running=1)
    rt = FakeRuntime()
    srv = start_server(paths, rt)
    try:
        with Client(socket=paths.socket, timeout=30) as c:
            f1 = c.execute_future(make_request(["/bin/sleep", "1"]))
            wait_for(lambda: rt.running == 1, what="first run")
            f2 = c.execute_future(make_request(["/bin/true"]))
            wait_for(lambda: srv.core.admission.snapshot().queued == 1, what="queued")
            f2.cancel()
            wait_for(lambda: srv.core.admission.snapshot().queued == 0, 2, "dequeue")
            assert f1.result().result.status == pb.STATUS_OK
            assert len(rt.plans) == 1   # the cancelled request never ran
    finally:
        srv.stop(0.5)
        remove_tree(base)


def test_metrics_endpoint(env):
    env.client.execute(["/bin/true"])
    from sandboxd.engine.metrics import MetricsServer
    ms = MetricsServer(env.srv.core.metrics, "127.0.0.1:0")
    try:
        body = urllib.request.urlopen(f"http://{ms.address}/metrics", timeout=5).read().decode()
    finally:
        ms.close()
    assert 'sandboxd_runs_total{tenant="alice",status="OK"} 1' in body
    assert 'sandboxd_request_duration_seconds_count{method="Execute"} 1' in body


# -- a separate server process: reload, shutdown, crash ----------------------------------------
@pytest.fixture
def proc_env():
    need_root()
    base = short_tmp()
    paths = write_config(base)
    procs = []
    yield SimpleNamespace(paths=paths, procs=procs)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    remove_tree(base)


def test_reload_on_sighup_good_and_bad(proc_env):
    paths = proc_env.paths
    p = spawn_server(paths)
    proc_env.procs.append(p)
    c = Client(socket=paths.socket, timeout=10)
    assert c.explain(["/bin/true"], limits={"memory_bytes": 512 << 20}).decision.allowed is False
    svc = os.path.join(paths.policy_dir, "svc.yaml")
    text = open(svc).read()
    with open(svc, "w") as f:
        f.write(text.replace("max: 256Mi", "max: 1Gi"))
    os.kill(p.pid, signal.SIGHUP)
    wait_for(lambda: c.explain(["/bin/true"], limits={"memory_bytes": 512 << 20}).decision.allowed,
             5, "the good reload")
    # A bad reload keeps the policies in force and says why, with file and line.
    with open(svc, "w") as f:
        f.write(text.replace("max: 256Mi", "max: 1Gi") + "capabilities: [CAP_BOGUS]\n")
    os.kill(p.pid, signal.SIGHUP)
    wait_for(lambda: any(not r["ok"] for r in audit_records(paths, "reload")), 5, "the bad reload")
    bad = [r for r in audit_records(paths, "reload") if not r["ok"]][-1]
    assert any("svc.yaml:" in x and "unknown capability 'CAP_BOGUS'" in x for x in bad["problems"])
    assert c.explain(["/bin/true"], limits={"memory_bytes": 512 << 20}).decision.allowed
    log = open(os.path.join(paths.base, "server.log")).read()
    assert "reload failed, keeping the previous policies" in log
    c.close()


def test_graceful_shutdown_cancels_runs_after_the_grace_and_cleans_up(proc_env):
    paths = proc_env.paths   # shutdown_grace_ms: 2000
    p = spawn_server(paths)
    proc_env.procs.append(p)
    c = Client(socket=paths.socket, timeout=30)
    fut = c.execute_future(make_request(["/bin/sleep", "60"], files=[("f", b"x")]))
    wait_for(lambda: work_entries(paths), 5, "the run to start")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    try:
        status = fut.result(timeout=20).result.status
        assert status == pb.STATUS_CANCELLED
    except grpc.RpcError as e:   # the server may also end the call itself
        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert p.wait(timeout=20) == 0
    assert 1.5 < time.monotonic() - t0 < 15
    assert not os.path.exists(paths.socket)
    assert work_entries(paths) == []
    assert not any(m.startswith(paths.state_dir) for m in mount_points())
    assert audit_records(paths, "stop")
    c.close()


def test_crash_recovery_removes_leftovers_before_serving(proc_env):
    paths = proc_env.paths
    p = spawn_server(paths)
    proc_env.procs.append(p)
    c = Client(socket=paths.socket, timeout=30)
    fut = c.execute_future(make_request(["/bin/sleep", "60"], files=[("f", b"x")]))
    left = wait_for(lambda: work_entries(paths), 5, "the run to start")
    p.kill()   # SIGKILL mid-run: nothing gets cleaned up
    p.wait()
    with pytest.raises(grpc.RpcError):
        fut.result(timeout=10)
    top = os.path.join(paths.state_dir, "work", left[0])
    assert top in mount_points() and os.path.exists(paths.socket)   # leftovers are real
    p2 = spawn_server(paths)
    proc_env.procs.append(p2)
    assert work_entries(paths) == [] and top not in mount_points()
    start = [r for r in audit_records(paths, "start")][-1]
    assert f"unmounted {top}" in start["recovered"]
    c2 = Client(socket=paths.socket, timeout=10)
    assert c2.execute(["/bin/true"]).result.status == pb.STATUS_OK
    c.close()
    c2.close()
    p2.send_signal(signal.SIGTERM)
    assert p2.wait(timeout=20) == 0


def test_second_instance_on_the_same_state_dir_is_refused(proc_env):
    paths = proc_env.paths
    p = spawn_server(paths)
    proc_env.procs.append(p)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "api_fake_server.py"), paths.config],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "another sandboxd is running with this state directory" in r.stderr
    wait_serving(paths.socket)   # the first one is untouched


# -- the command line against a server -------------------------------------------------------
def _cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxd.cli", *args], cwd=ROOT, input=stdin,
                          capture_output=True, timeout=60)


def test_cli_exec_explain_and_errors(env, tmp_path):
    sock = env.paths.socket
    r = _cli("exec", "--socket", sock, "--", "/bin/echo", "from", "cli")
    assert r.returncode == 0, r.stderr
    assert b"status: OK" in r.stdout and b"from cli" in r.stdout
    local = tmp_path / "data.txt"
    local.write_bytes(b"file content")
    r = _cli("exec", "--socket", sock, "--file", f"{local}:in.txt", "--output", "out.txt",
             "--output-dir", str(tmp_path), "--json", "--", "/bin/cp", "in.txt", "out.txt")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"]["status"] == "STATUS_OK"
    assert (tmp_path / "out.txt").read_bytes() == b"file content"
    r = _cli("exec", "--socket", sock, "--stdin", "-", "--", "/bin/cat", stdin=b"piped")
    assert b"piped" in r.stdout
    r = _cli("exec", "--socket", sock, "--stream", "--", "/bin/cat", stdin=b"streamed\n")
    assert r.returncode == 0 and r.stdout == b"streamed\n" and b"status: OK" in r.stderr
    r = _cli("exec", "--socket", sock, "--exit-code", "--", "/bin/false")
    assert r.returncode == 1
    r = _cli("exec", "--socket", sock, "--memory", "4GiB", "--", "/bin/true")
    assert r.returncode == 3
    assert b"PERMISSION_DENIED: authorize: limits.memory_bytes: asked 4294967296" in r.stderr
    r = _cli("explain", "--socket", sock, "--cpu-time", "2s", "--", "/bin/true")
    assert r.returncode == 0 and b"decision: ALLOWED  tenant=alice policy=svc" in r.stdout
    assert b'"cpu_time_ms": 2000' in r.stdout
    r = _cli("explain", "--socket", sock, "--cpu-time", "60s", "--", "/bin/true")
    assert r.returncode == 1 and b"limits.cpu_time_ms: asked 60000" in r.stdout
    r = _cli("explain", "--config", env.paths.config, "--tenant", "bob", "--policy", "svc",
             "--json", "--", "/bin/true")
    assert r.returncode == 0 and json.loads(r.stdout)["decision"]["tenant"] == "bob"


def test_generated_code_is_current():
    r = subprocess.run([os.path.join(ROOT, "scripts", "gen_proto.sh"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sandbox_failures_are_statuses_with_the_step(env):
    code, e = code_of(env.client.execute, ["/usr/bin/launch-fail"])
    assert code == grpc.StatusCode.INTERNAL
    assert e.details["kind"] == "LaunchError" and e.details["step"] == "execve"
    assert e.details["path"] == "/usr/bin/launch-fail"
    assert audit_records(env.paths, "error")[-1]["error"]["kind"] == "LaunchError"
    assert 'sandboxd_sandbox_errors_total{tenant="alice",kind="LaunchError"} 1' in \
        env.srv.core.metrics.render()


def test_cancelling_a_stream_kills_the_run(env):
    gate = threading.Event()

    def reqs():
        yield pb.ExecuteStreamRequest(start=make_request(["/bin/cat"]))
        gate.wait(10)   # keep stdin open: cat runs until we cancel
    call = env.client.stub.ExecuteStream(reqs(), timeout=30)
    assert next(call).WhichOneof("kind") == "started"
    assert env.rt.running == 1
    call.cancel()
    wait_for(lambda: env.rt.running == 0, 3, "the streamed run to end")
    gate.set()
    rec = wait_for(lambda: audit_records(env.paths, "run"), 3, "audit")[-1]
    assert rec["method"] == "ExecuteStream"
