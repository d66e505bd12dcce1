"""Network segmentation on the real kernel (root): segments, isolation, egress, cleanup.

Every address these tests talk to is one they (or the NetworkManager under test) created, in
namespaces they created: sandboxes are stand-in processes in fresh network+mount namespaces
(`unshare --net --mount`), attached through /proc/<pid>/ns/net like the runtime does; the
"outside" is a namespace the test makes, holding 198.51.100.10 (TEST-NET-2) on its loopback;
the host is touched only through listeners on its own 127.0.0.1 and an abstract unix socket,
which must stay unreachable. Probes run inside the stand-ins with nsenter.

Each negative probe has a positive twin (the same probe succeeding where it should), so a
broken probe cannot pass as isolation.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sandboxd.errors import LaunchError, PlanError
from sandboxd.network import NetworkManager, parse_network_config
from sandboxd.network import nsutil
from sandboxd.network.rtnl import Rtnl
from sandboxd.plan import NetworkPlan

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("host lacks: root (network namespaces, veth, nftables need CAP_NET_ADMIN)",
                allow_module_level=True)

OUTSIDE_HOST = "198.51.100.10"          # TEST-NET-2, only ever inside the test's "outside" ns
ALLOWED_TCP, DENIED_TCP, ALLOWED_UDP, DENIED_UDP = 8080, 8081, 5353, 5354
UPLINK_ADDR = "169.254.231.2"           # sandboxd's side of the uplink: what the outside sees
SEG_A = "a"        # egress: ALLOWED_TCP/tcp and ALLOWED_UDP/udp to OUTSIDE_HOST
SEG_B = "b"        # egress: port 9/tcp only (so it has a gateway: routes to it exist)
SEG_C = "c"        # no egress rules: no gateway, no route out
PROBE_TIMEOUT = 1.0

# A small probe/echo program run inside namespaces. "serve" echoes "<peer-ip> <data>" back;
# "connect" prints "OK <reply>" or "ERR <errno-name|timeout|resolve>".
AGENT = textwrap.dedent(r"""
    import errno, socket, sys
    cmd = sys.argv[1]
    if cmd == "serve":
        proto, addr, port = sys.argv[2], sys.argv[3], sys.argv[4]
        if proto == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind("\0" + addr)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp"
                              else socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, int(port)))
        if proto != "udp":
            s.listen(16)
        print("READY", s.getsockname()[1] if proto != "unix" else 0, flush=True)
        while True:
            if proto == "udp":
                data, peer = s.recvfrom(1024)
                s.sendto(peer[0].encode() + b" " + data, peer)
            else:
                c, peer = s.accept()
                data = c.recv(1024)
                c.sendall((peer[0] if peer else "unix").encode() + b" " + data)
                c.close()
    elif cmd == "connect":
        proto, host, port, timeout = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
        try:
            if proto == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target = "\0" + host
            else:
                ip = socket.gethostbyname(host)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp"
                                  else socket.SOCK_DGRAM)
                target = (ip, int(port))
        except OSError:
            print("ERR resolve"); sys.exit(0)
        s.settimeout(timeout)
        try:
            if proto == "udp":
                s.sendto(b"ping", target)
                print("OK", s.recvfrom(1024)[0].decode())
            else:
                s.connect(target)
                s.sendall(b"ping")
                print("OK", s.recv(1024).decode())
        except socket.timeout:
            print("ERR timeout")
        except OSError as e:
            print("ERR", errno.errorcode.get(e.errno, e.errno))
    elif cmd == "resolve":
        try:
            print(socket.gethostbyname(sys.argv[2]))
        except OSError:
            print("ERR resolve")
""")
PY = [sys.executable, "-I", "-S", "-c", AGENT]


# -- stand-ins -----------------------------------------------------------------------------

class Member:
    """A stand-in sandbox: `sleep` in a fresh network + mount namespace (optionally userns)."""

    def __init__(self, userns: bool = False) -> None:
        cmd = ["unshare", "--net", "--mount", "--propagation", "private"]
        if userns:
            # Like the runtime: the run's netns belongs to the run's own user namespace.
            cmd[1:1] = ["--user", "--map-root-user"]
        self.proc = subprocess.Popen(cmd + ["sleep", "infinity"])
        deadline = time.monotonic() + 5
        while _comm(self.proc.pid) != "sleep":
            assert time.monotonic() < deadline, "stand-in did not start"
            time.sleep(0.002)
        self.pid = self.proc.pid
        self.netns = f"/proc/{self.pid}/ns/net"
        self.servers: list[subprocess.Popen] = []

    def nsenter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "--"]

    def bind_hosts(self, path: str) -> None:
        """What the runtime does before attach: the segment's hosts file as /etc/hosts, ro."""
        subprocess.run(self.nsenter() + ["mount", "--bind", path, "/etc/hosts"], check=True)
        subprocess.run(self.nsenter() + ["mount", "-o", "remount,bind,ro", "/etc/hosts"],
                       check=True)

    def probe(self, proto: str, host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str:
        return _run(self.nsenter() + PY + ["connect", proto, host, str(port), str(timeout)])

    def resolve(self, name: str) -> str:
        return _run(self.nsenter() + PY + ["resolve", name])

    def serve(self, proto: str, addr: str, port: int) -> int:
        p, port = _serve(self.nsenter(), proto, addr, port)
        self.servers.append(p)
        return port

    def links(self) -> list[str]:
        out = subprocess.run(self.nsenter() + ["ip", "-j", "link"], capture_output=True,
                             text=True, check=True).stdout
        return [l["ifname"] for l in json.loads(out)]

    def ip(self, *args: str) -> None:
        subprocess.run(self.nsenter() + ["ip", *args], check=True)

    def close(self) -> None:
        for p in self.servers + [self.proc]:
            p.kill()
            p.wait()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()


def _serve(prefix: list[str], proto: str, addr: str, port: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(prefix + PY + ["serve", proto, addr, str(port)], stdout=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline().split()
    assert line and line[0] == "READY", f"server did not start: {line}"
    return p, int(line[1])


class Outside:
    """The test's "outside world": a named netns holding OUTSIDE_HOST on its loopback."""

    def __init__(self) -> None:
        self.path = f"/run/netns/sbxt-{secrets.token_hex(3)}-out"
        os.makedirs("/run/netns", exist_ok=True)
        home = nsutil.open_netns("/proc/thread-self/ns/net")
        try:
            fd = nsutil.create_named_netns(self.path, home)
            with Rtnl.inside(fd, home, "outside") as r:
                r.set_up(1, "lo")
                r.add_address(1, "lo", ipaddress.IPv4Interface(f"{OUTSIDE_HOST}/32"))
            os.close(fd)
        finally:
            os.close(home)
        self.servers: list[subprocess.Popen] = []

    def serve(self, proto: str, port: int) -> None:
        p, _ = _serve(["nsenter", f"--net={self.path}", "--"], proto, OUTSIDE_HOST, port)
        self.servers.append(p)

    def links(self) -> list[str]:
        out = subprocess.run(["nsenter", f"--net={self.path}", "ip", "-j", "link"],
                             capture_output=True, text=True, check=True).stdout
        return [l["ifname"] for l in json.loads(out)]

    def close(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()
        nsutil.remove_named_netns(self.path, missing_ok=True)


def _config(tmp_path, outside: Outside | None):
    data = {
        "state_dir": str(tmp_path / "state"),
        "segments": {
            SEG_A: {"subnet": "10.231.1.0/24"},
            SEG_B: {"subnet": "10.231.2.0/24"},
            SEG_C: {"subnet": "10.231.3.0/24"},
        },
    }
    if outside is not None:
        data["uplink"] = {"netns": outside.path}
        data["segments"][SEG_A]["egress"] = [
            {"cidr": f"{OUTSIDE_HOST}/32", "ports": [ALLOWED_TCP], "protocol": "tcp"},
            {"cidr": f"{OUTSIDE_HOST}/32", "ports": [ALLOWED_UDP], "protocol": "udp"},
        ]
        data["segments"][SEG_B]["egress"] = [{"cidr": f"{OUTSIDE_HOST}/32", "ports": [9]}]
    return parse_network_config(data, "test")


def _instance() -> str:
    return "t" + secrets.token_hex(4)


def _owned_links(mgr: NetworkManager) -> dict[str, dict]:
    out = subprocess.run(["nsenter", f"--net={mgr.netns_path}", "ip", "-j", "-d", "link"],
                         capture_output=True, text=True, check=True).stdout
    return {l["ifname"]: l for l in json.loads(out)}


def _host_snapshot() -> tuple[set[str], str]:
    links = {l["ifname"] for l in json.loads(_run(["ip", "-j", "link"]))}
    return links, _run(["nft", "list", "tables"])


def _wait(pred, what: str, timeout: float = 10.0) -> None:
    """Network namespace teardown is asynchronous in the kernel: poll for its effects."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)


SEGMENT_A = NetworkPlan(mode="segment", segment=SEG_A)
SEGMENT_B = NetworkPlan(mode="segment", segment=SEG_B)
SEGMENT_C = NetworkPlan(mode="segment", segment=SEG_C)


@pytest.fixture
def outside():
    o = Outside()
    yield o
    o.close()


@pytest.fixture
def members():
    made: list[Member] = []

    def make(userns: bool = False) -> Member:
        m = Member(userns)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


@pytest.fixture
def mgr(tmp_path, outside):
    host_before = _host_snapshot()
    m = NetworkManager(_instance(), _config(tmp_path, outside))
    m.cleanup_stale()
    yield m
    m.close()
    assert not os.path.exists(m.netns_path)
    _wait(lambda: m.uplink_ifname not in outside.links(), "uplink veth gone with the owned ns")
    # The host's own network configuration is never modified.
    assert _host_snapshot() == host_before


def _attach(mgr: NetworkManager, member: Member, plan: NetworkPlan, name: str) -> dict:
    member.bind_hosts(mgr.hosts_file(plan.segment))
    return mgr.attach(f"run-{name}", member.netns, plan, name=name)


# -- tests -----------------------------------------------------------------------------------

def test_members_of_one_segment_talk_tcp_udp_and_resolve_by_name(mgr, members):
    alice, bob = members(), members(userns=True)
    att_a = _attach(mgr, alice, SEGMENT_A, "alice")
    att_b = _attach(mgr, bob, SEGMENT_A, "bob")
    a_ip = att_a["address"].split("/")[0]
    b_ip = att_b["address"].split("/")[0]
    assert att_a["mode"] == "segment" and att_a["segment"] == SEG_A
    assert att_a["gateway"] == "10.231.1.1"           # segment a has egress rules
    assert any("policy drop" in p for p in att_a["filter"]["policies"])
    assert any(r.startswith("egress_s0: ") and r.endswith(" drop")
               for r in att_a["filter"]["rules"])
    # alice was attached first, then bob: alice's bind of the hosts file sees bob (in place).
    assert alice.resolve("bob") == b_ip
    assert bob.resolve("alice") == a_ip
    bob.serve("tcp", "0.0.0.0", 7000)
    bob.serve("udp", "0.0.0.0", 7000)
    assert alice.probe("tcp", "bob", 7000) == f"OK {a_ip} ping"      # no NAT inside a segment
    assert alice.probe("udp", "bob", 7000) == f"OK {a_ip} ping"
    # A detached member disappears from the hosts file its peers still have bound.
    mgr.detach("run-bob")
    assert alice.resolve("bob") == "ERR resolve"
    assert mgr.members(SEG_A) == [{"run_id": "run-alice", "segment": SEG_A, "name": "alice",
                                   "address": att_a["address"]}]


def test_segment_member_cannot_reach_other_segment_owned_ns_or_host(mgr, members):
    a1, a2, b1, c1 = members(), members(), members(), members()
    att_a1 = _attach(mgr, a1, SEGMENT_A, "a1")
    _attach(mgr, a2, SEGMENT_A, "a2")
    att_b1 = _attach(mgr, b1, SEGMENT_B, "b1")
    att_c1 = _attach(mgr, c1, SEGMENT_C, "c1")
    a_ip, b_ip, c_ip = (att["address"].split("/")[0] for att in (att_a1, att_b1, att_c1))
    assert att_b1["gateway"] == "10.231.2.1"
    assert att_c1["gateway"] is None                    # no egress rules: no route out at all
    for m in (b1, c1, a2):
        m.serve("tcp", "0.0.0.0", 7000)
    b1.serve("udp", "0.0.0.0", 7000)

    # Positive twins: the probes work where they should.
    assert a1.probe("tcp", "a2", 7000).startswith("OK ")
    for m in (b1, c1):
        assert _run(m.nsenter() + PY + ["connect", "tcp", "127.0.0.1", "7000", "1"]).startswith("OK")

    before = mgr.counters()["forward_dropped"]["packets"]
    # a -> b is routed by sandboxd's namespace (both have gateways there) and dropped.
    assert a1.probe("tcp", b_ip, 7000) == "ERR timeout"
    assert a1.probe("udp", b_ip, 7000) == "ERR timeout"
    assert b1.probe("tcp", a_ip, 7000) == "ERR timeout"
    assert mgr.counters()["forward_dropped"]["packets"] >= before + 3
    # a -> c: c's bridge has no address, so the owned namespace has no route to c at all; the
    # packet heads for the uplink and a's allowlist drops it.
    before = mgr.counters()["segments"][SEG_A]["egress_dropped"]["packets"]
    assert a1.probe("tcp", c_ip, 7000) == "ERR timeout"
    assert mgr.counters()["segments"][SEG_A]["egress_dropped"]["packets"] > before
    # c has no route anywhere but its own subnet.
    assert c1.probe("tcp", a_ip, 7000) == "ERR ENETUNREACH"
    # Other segments' members are not in a segment's hosts file.
    assert a1.resolve("b1") == "ERR resolve"
    assert b1.resolve("a1") == "ERR resolve"

    # A listener in sandboxd's own namespace (where the gateway address lives).
    home = nsutil.open_netns("/proc/thread-self/ns/net")
    try:
        with nsutil.entered(mgr.owned_netns_fd, home):
            import socket
            lst = socket.socket()
            lst.bind(("0.0.0.0", 7001))
            lst.listen(4)
            ctl = socket.create_connection(("127.0.0.1", 7001), timeout=2)   # positive twin
            ctl.close()
    finally:
        os.close(home)
    try:
        before = mgr.counters()["input_dropped"]["packets"]
        assert a1.probe("tcp", "10.231.1.1", 7001) == "ERR timeout"    # own gateway
        assert a1.probe("tcp", "10.231.2.1", 7001) == "ERR timeout"    # b's gateway
        assert a1.probe("tcp", UPLINK_ADDR, 7001) == "ERR timeout"
        assert mgr.counters()["input_dropped"]["packets"] > before
    finally:
        lst.close()          # a socket pins its namespace: close before the manager goes

    # The host: a listener on the host's 127.0.0.1 and an abstract unix socket.
    host_tcp, port = _serve([], "tcp", "127.0.0.1", 0)
    name = f"sbxt-{secrets.token_hex(4)}"
    host_unix, _ = _serve([], "unix", name, 0)
    try:
        assert _run(PY + ["connect", "tcp", "127.0.0.1", str(port), "1"]) == "OK 127.0.0.1 ping"
        assert _run(PY + ["connect", "unix", name, "0", "1"]) == "OK unix ping"
        for m in (a1, c1):
            assert m.probe("tcp", "127.0.0.1", port) == "ERR ECONNREFUSED"   # its own lo
            assert m.probe("unix", name, 0) == "ERR ECONNREFUSED"   # abstract names are per-netns
    finally:
        for p in (host_tcp, host_unix):
            p.kill()
            p.wait()


def test_mode_none_reaches_nothing_not_even_host_loopback(mgr, members):
    # What the runtime does for `none` (fresh netns, lo up), with our stand-in.
    m = members()
    m.ip("link", "set", "lo", "up")
    assert mgr.attach("run-none", m.netns, NetworkPlan(), name="x") == {"mode": "none"}
    assert m.links() == ["lo"]
    host_tcp, port = _serve([], "tcp", "127.0.0.1", 0)
    name = f"sbxt-{secrets.token_hex(4)}"
    host_unix, _ = _serve([], "unix", name, 0)
    try:
        assert _run(PY + ["connect", "tcp", "127.0.0.1", str(port), "1"]).startswith("OK")
        assert m.probe("tcp", "127.0.0.1", port) == "ERR ECONNREFUSED"
        assert m.probe("unix", name, 0) == "ERR ECONNREFUSED"
        assert m.probe("tcp", OUTSIDE_HOST, ALLOWED_TCP) == "ERR ENETUNREACH"
    finally:
        for p in (host_tcp, host_unix):
            p.kill()
            p.wait()
    assert mgr.owned_netns_fd is None           # `none` created nothing


def test_egress_reaches_only_the_allowlisted_host_and_ports(mgr, members, outside):
    for proto, port in (("tcp", ALLOWED_TCP), ("tcp", DENIED_TCP), ("udp", ALLOWED_UDP),
                        ("udp", DENIED_UDP)):
        outside.serve(proto, port)
    a, b, c = members(), members(), members()
    _attach(mgr, a, SEGMENT_A, "a")
    _attach(mgr, b, SEGMENT_B, "b")
    _attach(mgr, c, SEGMENT_C, "c")
    # Allowed: and the outside sees sandboxd's uplink address, not the sandbox's.
    assert a.probe("tcp", OUTSIDE_HOST, ALLOWED_TCP) == f"OK {UPLINK_ADDR} ping"
    assert a.probe("udp", OUTSIDE_HOST, ALLOWED_UDP) == f"OK {UPLINK_ADDR} ping"
    # Positive twin of the denied ports: they do answer, from inside the outside namespace.
    for proto, port in (("tcp", DENIED_TCP), ("udp", DENIED_UDP)):
        assert _run(["nsenter", f"--net={outside.path}"] + PY +
                    ["connect", proto, OUTSIDE_HOST, str(port), "1"]).startswith("OK")
    c0 = mgr.counters()["segments"][SEG_A]
    assert c0["egress_allowed"]["packets"] >= 2
    assert a.probe("tcp", OUTSIDE_HOST, DENIED_TCP) == "ERR timeout"
    c1 = mgr.counters()["segments"][SEG_A]
    assert c1["egress_dropped"]["packets"] > c0["egress_dropped"]["packets"]
    assert a.probe("udp", OUTSIDE_HOST, DENIED_UDP) == "ERR timeout"
    c2 = mgr.counters()["segments"][SEG_A]
    assert c2["egress_dropped"]["packets"] > c1["egress_dropped"]["packets"]
    # The uplink namespace's own address is not on the allowlist either.
    assert a.probe("tcp", "169.254.231.1", ALLOWED_TCP) == "ERR timeout"
    # Another segment's allowlist is its own: b may not use a's ports.
    assert b.probe("tcp", OUTSIDE_HOST, ALLOWED_TCP) == "ERR timeout"
    assert mgr.counters()["segments"][SEG_B]["egress_allowed"]["packets"] == 0
    assert mgr.counters()["segments"][SEG_B]["egress_dropped"]["packets"] > 0
    # A segment without egress rules has no way out.
    assert c.probe("tcp", OUTSIDE_HOST, ALLOWED_TCP) == "ERR ENETUNREACH"


def test_spoofed_source_is_dropped(mgr, members):
    a = members()
    att = _attach(mgr, a, SEGMENT_A, "a")
    # Resolve the gateway's MAC legitimately first: an ARP request from a forged address
    # already fails (rp_filter), and we want the forged IP packet itself to reach the filter.
    a.probe("udp", OUTSIDE_HOST, ALLOWED_UDP, timeout=0.2)
    # The workload cannot do this (no CAP_NET_ADMIN); we do it to test the filter behind it.
    a.ip("addr", "add", "10.231.2.77/32", "dev", "eth0")
    before = mgr.counters()["spoof_dropped"]["packets"]
    out = _run(a.nsenter() + [sys.executable, "-I", "-S", "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("10.231.2.77", 0))
        s.sendto(b"x", ("{OUTSIDE_HOST}", {ALLOWED_UDP}))
        print("sent")
    """)])
    assert out == "sent"
    _wait(lambda: mgr.counters()["spoof_dropped"]["packets"] > before, "spoof counter")
    assert att["address"].startswith("10.231.1.")


def test_attach_refuses_host_owned_and_uplink_namespaces(mgr, members, outside):
    host_before = _host_snapshot()
    _attach(mgr, members(), SEGMENT_A, "first")          # builds the owned namespace
    for path in ("/proc/self/ns/net", mgr.netns_path, outside.path):
        with pytest.raises(PlanError, match="refusing to attach a namespace"):
            mgr.attach("run-x", path, SEGMENT_A, name="x")
    assert _host_snapshot() == host_before
    with pytest.raises(LaunchError, match="not a network namespace"):
        mgr.attach("run-x", f"/proc/{os.getpid()}/ns/mnt", SEGMENT_A, name="x")
    with pytest.raises(PlanError, match="unknown network segment 'nope'"):
        mgr.attach("run-x", "/proc/self/ns/net", NetworkPlan(mode="segment", segment="nope"))
    m = members()
    _attach(mgr, m, SEGMENT_A, "dup")
    m2 = members()
    with pytest.raises(PlanError, match="already used on segment"):
        mgr.attach("run-y", m2.netns, SEGMENT_A, name="dup")
    with pytest.raises(PlanError, match="already attached"):
        mgr.attach("run-dup", m2.netns, SEGMENT_A, name="other")
    assert m2.links() == ["lo"]


def test_failed_attach_leaves_nothing(mgr, members):
    m = members()
    m.ip("link", "add", "eth0", "type", "veth", "peer", "name", "x0")   # the name we need
    with pytest.raises(LaunchError, match="veth_create") as ei:
        _attach(mgr, m, SEGMENT_A, "m")
    assert ei.value.errno == 17          # EEXIST, named
    assert mgr.members() == []
    assert "\tm\n" not in open(mgr.hosts_file(SEG_A)).read()
    mgr.flush()
    assert not [n for n in _owned_links(mgr) if n.startswith("sv")]


def test_detach_disconnects_at_once_and_flush_destroys(mgr, members):
    a, b = members(), members()
    _attach(mgr, a, SEGMENT_A, "a")
    _attach(mgr, b, SEGMENT_A, "b")
    b.serve("tcp", "0.0.0.0", 7000)
    assert a.probe("tcp", "b", 7000).startswith("OK")
    b_ip = mgr.members()[1]["address"].split("/")[0]
    mgr.detach("run-b")
    mgr.detach("run-b")                                  # idempotent
    assert a.probe("tcp", b_ip, 7000) == "ERR timeout"   # b is alive but cut off
    links = _owned_links(mgr)
    trashed = [l for n, l in links.items() if n.startswith("sv") and "master" not in l]
    assert len(trashed) == 1 and "UP" not in trashed[0]["flags"]
    mgr.flush()
    assert len([n for n in _owned_links(mgr) if n.startswith("sv")]) == 1     # a's only
    assert "eth0" not in b.links()
    # b's address is quarantined (a still caches b's MAC for it): a newcomer gets another.
    c = members()
    assert _attach(mgr, c, SEGMENT_A, "c")["address"].split("/")[0] != b_ip


def test_hundred_attach_detach_cycles_leave_nothing(mgr, members, outside):
    fds_before = None
    for i in range(100):
        m = Member()
        try:
            mgr.attach(f"run-{i}", m.netns, (SEGMENT_A, SEGMENT_B, SEGMENT_C)[i % 3],
                       name=f"m{i}")
            if fds_before is None:
                # Earlier tests' garbage (an unclosed socket object) must not be collected
                # mid-loop and look like fewer fds.
                gc.collect()
                fds_before = len(os.listdir("/proc/self/fd"))
            mgr.detach(f"run-{i}")
        finally:
            m.close()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds_before       # no fd leaked per run
    mgr.flush()
    assert mgr.members() == []
    _wait(lambda: sorted(_owned_links(mgr)) == ["lo", "sbr0", "sbr1", "sbr2", "up0"],
          "only lo, the bridges and the uplink remain")
    for seg in (SEG_A, SEG_B, SEG_C):
        lines = [l for l in open(mgr.hosts_file(seg)) if not l.startswith(("#", "127.", "::1"))]
        assert lines == []
    assert outside.links() == ["lo", mgr.uplink_ifname]


CRASHER = textwrap.dedent("""
    import json, sys, time
    from sandboxd.network import NetworkManager, parse_network_config
    from sandboxd.plan import NetworkPlan
    inst, cfg, netns = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    m = NetworkManager(inst, parse_network_config(cfg))
    m.cleanup_stale()
    m.hosts_file("a")
    m.attach("run-c", netns, NetworkPlan(mode="segment", segment="a"), name="c")
    print("ATTACHED", flush=True)
    time.sleep(3600)
""")


def test_crash_leaves_only_what_cleanup_stale_removes(tmp_path, outside, members):
    host_before = _host_snapshot()
    inst = _instance()
    cfg = {"state_dir": str(tmp_path / "state"), "uplink": {"netns": outside.path},
           "segments": {"a": {"subnet": "10.231.1.0/24", "egress": [
               {"cidr": f"{OUTSIDE_HOST}/32", "ports": [ALLOWED_TCP]}]}}}
    victim = members()
    child = subprocess.Popen([sys.executable, "-c", CRASHER, inst, json.dumps(cfg), victim.netns],
                             stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert child.stdout.readline().strip() == "ATTACHED"
        assert "eth0" in victim.links()
        mgr = NetworkManager(inst, parse_network_config(cfg))
        with pytest.raises(LaunchError, match=f"is in use by pid {child.pid}"):
            mgr.cleanup_stale()                   # never tear down a live launcher's network
        child.send_signal(signal.SIGKILL)
        child.wait()
        removed = mgr.cleanup_stale()
        assert mgr.netns_path in removed
        assert os.path.join(mgr.state_path, "hosts.a") in removed
        assert not os.path.exists(mgr.netns_path)
        assert mgr.netns_path not in open("/proc/self/mountinfo").read()
        # Destroying the owned namespace destroyed every veth pair with it (asynchronously).
        _wait(lambda: "eth0" not in victim.links(), "sandbox end of the veth gone")
        _wait(lambda: outside.links() == ["lo"], "uplink veth gone")
        assert mgr.cleanup_stale() == []          # idempotent
        mgr.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait()
    assert _host_snapshot() == host_before
