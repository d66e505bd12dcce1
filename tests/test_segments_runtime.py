"""Segments through the real runtime: two sandboxes on one segment talk by name; a third on
another segment cannot reach them. Every address here is one the runtime's own segment
namespace made; nothing else is contacted."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from sandboxd import planner
from sandboxd.plan import Limits, NetworkPlan, Status
from tests.conftest import need_root

PY = "/usr/bin/python3"
PORT = 8080

SERVER = f"""
import socket
s = socket.socket(); s.bind(("0.0.0.0", {PORT})); s.listen(1); s.settimeout(10)
c, _ = s.accept(); c.sendall(b"hello from " + socket.gethostname().encode()); c.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", {PORT})); u.settimeout(10)
d, a = u.recvfrom(100); u.sendto(d.upper(), a)
"""

CLIENT = f"""
import socket, sys, time
peer = sys.argv[1]
addr = socket.gethostbyname(peer)
for _ in range(100):
    try:
        c = socket.create_connection((peer, {PORT}), timeout=1); break
    except OSError as e:
        err = e; time.sleep(0.05)
else:
    print("tcp-failed", err.errno); sys.exit(0)
print(addr, c.recv(100).decode())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
for _ in range(50):
    u.sendto(b"ping", (peer, {PORT}))
    try:
        print(u.recvfrom(100)[0].decode()); break
    except OSError:
        time.sleep(0.05)
"""

PROBE = f"""
import socket, sys
s = socket.socket(); s.settimeout(1)
try:
    s.connect((sys.argv[1], {PORT})); print("reached")
except OSError as e:
    print("blocked", type(e).__name__)
"""


@pytest.fixture(scope="module")
def seg_runtime():
    need_root()
    from sandboxd.runtime.client import Runtime
    from sandboxd.runtime.config import RuntimeConfig
    net = {"segments": {"lab": {"subnet": "10.251.7.0/24"}, "other": {"subnet": "10.251.8.0/24"}}}
    rt = Runtime(RuntimeConfig(instance=f"seg{os.getpid()}", network=net, prefork=1))
    yield rt
    rt.close()


def _plan(code, *args, segment, host):
    p = planner.build_plan([PY, "-c", code, *args], hostname=host,
                           limits=Limits(wall_time_ms=20_000, cpu_time_ms=10_000))
    return dataclasses.replace(
        p, network=NetworkPlan(mode="segment", segment=segment),
        landlock=dataclasses.replace(p.landlock, tcp_bind=(PORT,), tcp_connect=(PORT,)))


def test_two_members_talk_tcp_and_udp_by_name_and_others_cannot(seg_runtime):
    out = {}

    def serve():
        out["server"] = seg_runtime.run(_plan(SERVER, segment="lab", host="alpha"))

    t = threading.Thread(target=serve)
    t.start()
    client = seg_runtime.run(_plan(CLIENT, "alpha", segment="lab", host="beta"))
    t.join()
    server = out["server"]
    assert server.status == Status.OK, (server.status, server.stderr)
    assert client.status == Status.OK, (client.status, client.stderr)
    lines = client.stdout.decode().split("\n")
    assert lines[0].startswith("10.251.7.") and lines[0].endswith("hello from alpha"), lines
    assert lines[1] == "PING", lines
    att = client.attestation["network"]
    assert att["mode"] == "segment" and att["segment"] == "lab" and att["address"].startswith("10.251.7.")


def test_member_of_another_segment_is_cut_off(seg_runtime):
    out = {}

    def serve():
        out["server"] = seg_runtime.run(_plan(SERVER, segment="lab", host="gamma"))

    t = threading.Thread(target=serve)
    t.start()
    # The probe, on segment "other", tries the lab member's address directly (no name for it there).
    import time
    time.sleep(1.0)
    addr = None
    lab_hosts = "/run/sandboxd"
    for root, _, files in os.walk(lab_hosts):
        for f in files:
            if f == "hosts.lab" and f"seg{os.getpid()}" in root:
                for line in open(os.path.join(root, f)):
                    if line.split()[1:2] == ["gamma"]:
                        addr = line.split()[0]
    assert addr, "gamma not in the lab hosts file"
    probe = seg_runtime.run(_plan(PROBE, addr, segment="other", host="delta"))
    assert probe.status == Status.OK, probe.stderr
    assert probe.stdout.startswith(b"blocked"), probe.stdout
    # Unblock the server, from its own segment.
    seg_runtime.run(_plan(CLIENT, "gamma", segment="lab", host="epsilon"))
    t.join()
    assert out["server"].status == Status.OK


def test_concurrent_members_each_get_their_own_namespace_attached(seg_runtime):
    """Runs that take freshly spawned spares: the segment is attached to each run's own network
    namespace, never to the host's (init makes it after the launcher places it; attaching
    before that once refused the run: "not the run's own")."""
    code = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    results = {}

    def one(i):
        try:
            results[i] = seg_runtime.run(_plan(code, segment="lab", host=f"m{i}"))
        except Exception as e:       # a sandbox failure is what this test looks for
            results[i] = e

    for _round in range(3):
        results.clear()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in sorted(results.items()):
            assert not isinstance(r, Exception), (i, r)
            assert r.status == Status.OK, (i, r.status, r.stderr)
            assert r.stdout.strip() == b"['eth0', 'lo']", (i, r.stdout)
            assert r.attestation["network"]["address"].startswith("10.251.7.")
