"""End to end through the real daemon and the real runtime: nothing mocked.

A real server (gRPC on a unix socket behind SO_PEERCRED) runs real sandboxes through the real
launcher: files in and out, streaming, batches, limits and seccomp chosen by policy, 50
concurrent calls, cancellation and deadlines killing real processes, and crash recovery of a
daemon killed with SIGKILL mid-run.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import time
from types import SimpleNamespace

import grpc
import pytest

from sandboxd.api.gen.sandboxd.v1 import sandboxd_pb2 as pb
from sandboxd.client import Client, ClientError, make_request
from sandboxd.engine.workdir import mount_points
from tests.api_helpers import (audit_records, remove_tree, short_tmp, spawn_server, wait_for,
                               work_entries, write_config)
from tests.conftest import need_root

POLICY = """\
version: 1
name: svc
tenants: [alice]
commands: ["*"]
seccomp: {default: default, allowed: [judge]}
filesystem: {work_size_bytes: 16Mi}
limits:
  cpu_time_ms: {default: 5000, max: 20000}
  wall_time_ms: {default: 20000, max: 120000}
  memory_bytes: {default: 128Mi, max: 512Mi}
  pids: {default: 32, max: 64}
concurrency: {max_running: 4, max_queued: 64}
"""
RUNTIME = {"instance": "apitest"}   # its own cgroups: never touches another launcher's runs


def _runtime_or_skip() -> None:
    need_root()
    try:
        from sandboxd.runtime.client import Runtime  # noqa: F401
    except ImportError as e:   # pragma: no cover - the runtime is part of this repository
        pytest.fail(f"the runtime is missing: {e}")


@pytest.fixture(scope="module")
def real():
    _runtime_or_skip()
    from sandboxd.api.server import Server, make_runtime
    from sandboxd.engine.config import load_all
    base = short_tmp("sbxe")
    paths = write_config(base, policies={"e2e.yaml": POLICY}, runtime=RUNTIME)
    loaded = load_all(paths.config)
    srv = Server(loaded, lambda: make_runtime(loaded), log=lambda s: None)
    srv.start()
    c = Client(socket=paths.socket, timeout=120)
    yield SimpleNamespace(paths=paths, srv=srv, client=c)
    c.close()
    srv.stop(2)
    remove_tree(base)


def procs_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def test_execute_echo(real):
    r = real.client.execute(["/bin/echo", "hello", "world"])
    assert r.result.status == pb.STATUS_OK, r
    assert r.result.stdout == b"hello world\n" and r.decision.policy == "svc"
    assert r.result.wall_time_ms > 0


def test_files_in_and_out_through_the_real_sandbox(real):
    script = b"#!/bin/sh\nid -u > uid.txt\ncat in/data.txt | tr a-z A-Z > out.txt\npwd\nls\n"
    r = real.client.execute(["./run.sh"], files=[("run.sh", script, 0o755), ("in/data.txt", b"payload")],
                            output_files=["out.txt", "uid.txt"])
    assert r.result.status == pb.STATUS_OK, (r.result.stderr, r.result.stdout)
    out, uid = r.result.files
    assert out.content == b"PAYLOAD" and uid.content == b"1000\n"
    assert r.result.stdout.startswith(b"/box\n")
    assert work_entries(real.paths) == []


def test_limits_from_the_policy_reach_the_kernel(real):
    r = real.client.execute(["/usr/bin/python3", "-c", "b = bytearray(200 << 20); print(len(b))"],
                            limits={"memory_bytes": 64 << 20})
    assert r.result.status == pb.STATUS_MEMORY_LIMIT, r.result
    code_err = None
    try:
        real.client.execute(["/bin/true"], limits={"memory_bytes": 1 << 30})
    except ClientError as e:
        code_err = e
    assert code_err is not None and code_err.code == grpc.StatusCode.PERMISSION_DENIED


def test_seccomp_profile_chosen_by_request_within_the_policy(real):
    code = "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('traced')"
    r = real.client.execute(["/usr/bin/python3", "-c", code], seccomp_profile="judge")
    assert r.result.status == pb.STATUS_SYSCALL_DENIED, r.result
    assert "ptrace" in [d.name for d in r.result.denied_syscalls]
    # the policy's default profile answers EPERM instead: the request chose the stricter one
    r = real.client.execute(["/usr/bin/python3", "-c", code])
    assert r.result.status == pb.STATUS_OK and r.result.stdout == b"traced\n"


def test_execute_stream_is_interactive(real):
    q: "queue.Queue[pb.ExecuteStreamRequest | None]" = queue.Queue()
    q.put(pb.ExecuteStreamRequest(start=make_request(["/bin/cat"])))

    def reqs():
        while True:
            m = q.get()
            if m is None:
                return
            yield m
    responses = real.client.stub.ExecuteStream(reqs(), timeout=60)
    first = next(responses)
    assert first.WhichOneof("kind") == "started"
    for word in (b"ping\n", b"pong\n"):
        q.put(pb.ExecuteStreamRequest(stdin=word))
        m = next(responses)   # the echo arrives before we send anything more
        assert m.WhichOneof("kind") == "stdout" and m.stdout == word
    q.put(pb.ExecuteStreamRequest(close_stdin=pb.CloseStdin()))
    q.put(None)
    last = list(responses)[-1]
    assert last.result.result.status == pb.STATUS_OK


def test_batch_shares_read_only_files_and_judges_each_case(real):
    prog = make_request(["/bin/sh", "./solve.sh"], files=[("solve.sh", b"read n; echo $((n*2))\n", 0o755)])
    cases = [pb.BatchCase(name="one", stdin=b"21\n"),
             pb.BatchCase(name="tamper", stdin=b"0\n"),
             pb.BatchCase(name="two", stdin=b"50\n"),
             pb.BatchCase(name="slow", stdin=b"1\n", limits=pb.Limits(cpu_time_ms=200))]
    # "tamper" tries to change the shared program; "slow" spins past its own CPU limit
    prog_tamper = make_request(["/bin/sh", "-c", "echo 'echo hacked' > solve.sh; echo >> solve.sh; "
                                "cat solve.sh"], files=[("solve.sh", b"read n; echo $((n*2))\n", 0o755)])
    r = real.client.execute_batch(prog, [cases[0], cases[2]])
    assert [c.result.stdout for c in r.cases] == [b"42\n", b"100\n"]
    r = real.client.execute_batch(prog_tamper, [cases[1], cases[1]])
    for c in r.cases:
        assert c.result.stdout == b"read n; echo $((n*2))\n", c.result   # unchanged, each time
        assert b"Permission denied" in c.result.stderr
    spin = make_request(["/bin/sh", "-c", "while :; do :; done"])
    r = real.client.execute_batch(spin, [cases[3]])
    assert r.cases[0].result.status == pb.STATUS_TIME_LIMIT
    assert work_entries(real.paths) == []


def test_fifty_concurrent_executes(real):
    def one(i):
        return real.client.execute(["/bin/echo", str(i)]).result
    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(50)))
    assert [r.status for r in results] == [pb.STATUS_OK] * 50
    assert sorted(int(r.stdout) for r in results) == list(range(50))


def test_cancel_kills_the_real_process(real):
    marker = "61.0417"
    fut = real.client.execute_future(make_request(["/bin/sleep", marker]))
    wait_for(lambda: procs_with(marker), 10, "the sandboxed sleep to start")
    t0 = time.monotonic()
    fut.cancel()
    wait_for(lambda: not procs_with(marker), 5, "the sandboxed process to die")
    assert time.monotonic() - t0 < 3
    rec = wait_for(lambda: [r for r in audit_records(real.paths, "run") if r["argv"][-1] == marker],
                   5, "the audit record")
    assert rec[-1]["outcome"]["status"] == "CANCELLED"


def test_deadline_kills_the_real_process(real):
    marker = "62.0417"
    t0 = time.monotonic()
    with pytest.raises(ClientError) as ei:
        real.client.execute(["/bin/sleep", marker], timeout=1.0)
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: not procs_with(marker), 5, "the sandboxed process to die")
    assert time.monotonic() - t0 < 4


def _instance_cgroups(instance: str) -> list[str]:
    """Run cgroups of a runtime instance, in every v1 hierarchy (or v2)."""
    found = []
    for dirpath, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(dirpath) == f"sandboxd-{instance}":
            found += [os.path.join(dirpath, d) for d in dirs if d.startswith("run-")]
            dirs[:] = []
    return found


def test_crash_recovery_of_a_killed_daemon():
    _runtime_or_skip()
    base = short_tmp("sbxc")
    # An instance of its own: the module's server above is still running with RUNTIME's.
    paths = write_config(base, policies={"e2e.yaml": POLICY}, runtime={"instance": "apicrash"})
    procs = []
    try:
        p = spawn_server(paths, fake=False)
        procs.append(p)
        marker = "63.0417"
        c = Client(socket=paths.socket, timeout=60)
        fut = c.execute_future(make_request(["/bin/sleep", marker], files=[("f", b"x")]))
        wait_for(lambda: procs_with(marker), 10, "the sandboxed sleep to start")
        left = work_entries(paths)
        assert left
        old_cgroups = _instance_cgroups("apicrash")   # the running sandbox's, and the spares'
        assert old_cgroups
        os.kill(p.pid, signal.SIGKILL)   # no cleanup of any kind
        p.wait()
        with pytest.raises(grpc.RpcError):
            fut.result(timeout=10)
        top = os.path.join(paths.state_dir, "work", left[0])
        assert top in mount_points()
        p2 = spawn_server(paths, fake=False)
        procs.append(p2)
        # Before serving: the work directory and its mount are gone, the sandboxed process is
        # dead and none of the old instance's run cgroups is left (the new launcher has its own).
        assert work_entries(paths) == [] and top not in mount_points()
        assert not procs_with(marker)
        assert set(old_cgroups) & set(_instance_cgroups("apicrash")) == set()
        c2 = Client(socket=paths.socket, timeout=60)
        assert c2.execute(["/bin/true"]).result.status == pb.STATUS_OK
        c.close()
        c2.close()
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(timeout=30) == 0
        assert not os.path.exists(paths.socket)
    finally:
        for x in procs:
            if x.poll() is None:
                x.kill()
                x.wait()
        remove_tree(base)


def test_cancelling_a_stream_kills_the_real_process(real):
    marker = "64.0417"
    call = real.client.stub.ExecuteStream(
        iter([pb.ExecuteStreamRequest(start=make_request(["/bin/sleep", marker]))]), timeout=60)
    assert next(call).WhichOneof("kind") == "started"
    wait_for(lambda: procs_with(marker), 10, "the sandboxed sleep to start")
    call.cancel()
    wait_for(lambda: not procs_with(marker), 5, "the sandboxed process to die")
