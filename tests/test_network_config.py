"""Network decisions without root: config parsing, plan resolution, nft rendering, hosts files.

The kernel side is in test_network.py; here only pure functions and file handling.
"""

from __future__ import annotations

import os

import pytest

from sandboxd.errors import PlanError, PolicyError
from sandboxd.network import (NetworkConfig, NetworkManager, check_plan, parse_network_config,
                              resolve_network_plan)
from sandboxd.network import hosts, nftrules
from sandboxd.plan import NetworkPlan, Plan

GOOD = {
    "uplink": {"netns": "/run/netns/outside"},
    "segments": {
        "web": {"subnet": "10.200.1.0/24",
                "egress": [{"cidr": "198.51.100.0/24", "ports": [443, 80], "protocol": "tcp"},
                           {"cidr": "198.51.100.53/32", "ports": [53], "protocol": "udp"}]},
        "db": {"subnet": "10.200.2.0/28"},
    },
}


def test_parse_good_config():
    cfg = parse_network_config(GOOD, "net.yaml")
    assert [s.name for s in cfg.segments] == ["db", "web"]      # sorted: stable bridge names
    web = cfg.segment("web")
    assert str(web.gateway) == "10.200.1.1/24"
    assert web.egress[0].ports == (443, 80)
    assert cfg.uplink_netns == "/run/netns/outside"


def test_every_error_reported_at_once_with_key_paths():
    bad = {
        "uplink": {"netns": "relative/path", "colour": "blue"},
        "segments": {
            "Bad_Name": {"subnet": "10.0.0.0/24"},
            "a": {"subnet": "10.0.0.128/25"},                    # overlaps Bad_Name
            "b": {"subnet": "10.1.0.1/24"},                      # host bits set
            "c": {"subnet": "fd00::/64"},
            "d": {"subnet": "10.2.0.0/24", "egress": [{"cidr": "1.2.3.0/24", "ports": [],
                                                       "protocol": "icmp"},
                                                      {"cidr": "1.2.3.4/32", "ports": [0, 70000]}]},
            "e": {"subnet": "127.0.0.0/24", "extra": 1},
        },
    }
    with pytest.raises(PolicyError) as ei:
        parse_network_config(bad, "net.yaml")
    errs = ei.value.errors
    assert "net.yaml: network.uplink.colour: unknown key (allowed: netns, subnet)" in errs
    assert ("net.yaml: network.uplink.netns: must be an absolute path to a network namespace "
            "file") in errs
    assert "net.yaml: network.segments.Bad_Name: segment names are [a-z][a-z0-9-]{0,30}" in errs
    assert ("net.yaml: network.segments.a.subnet: 10.0.0.128/25 overlaps segment 'Bad_Name' "
            "(10.0.0.0/24)") in errs
    assert any(e.startswith("net.yaml: network.segments.b.subnet: '10.1.0.1/24' is not a network")
               for e in errs)
    assert any("network.segments.c.subnet: fd00::/64 is IPv6" in e for e in errs)
    assert ("net.yaml: network.segments.d.egress[0].protocol: 'icmp' is not one of tcp, udp"
            in errs)
    assert ("net.yaml: network.segments.d.egress[0].ports: must name at least one port "
            "(there is no 'any')") in errs
    assert "net.yaml: network.segments.d.egress[1].ports: 0 is not a port number 1..65535" in errs
    assert ("net.yaml: network.segments.d.egress[1].ports: 70000 is not a port number 1..65535"
            in errs)
    assert "net.yaml: network.segments.e.extra: unknown key (allowed: egress, subnet)" in errs
    assert ("net.yaml: network.segments.e.subnet: 127.0.0.0/24 overlaps reserved 127.0.0.0/8"
            in errs)
    assert len(errs) >= 12


def test_egress_without_uplink_is_a_load_time_error():
    with pytest.raises(PolicyError) as ei:
        parse_network_config({"segments": {"a": {"subnet": "10.9.0.0/24", "egress": [
            {"cidr": "0.0.0.0/0", "ports": [443]}]}}}, "n")
    assert ei.value.errors == ["n: network.segments.a.egress: egress rules need "
                               "network.uplink.netns (there is nowhere for traffic to leave to)"]


def test_segment_overlapping_uplink_subnet_refused():
    with pytest.raises(PolicyError) as ei:
        parse_network_config({"segments": {"a": {"subnet": "169.254.231.0/24"}}}, "n")
    assert ei.value.errors == ["n: network.segments.a.subnet: 169.254.231.0/24 overlaps the "
                               "uplink subnet 169.254.231.0/30"]


def test_resolve_modes():
    cfg = parse_network_config(GOOD)
    assert resolve_network_plan("none", cfg) == NetworkPlan(mode="none")
    assert resolve_network_plan(None, cfg) == NetworkPlan()
    assert resolve_network_plan({"segment": "web"}, cfg) == NetworkPlan(mode="segment",
                                                                         segment="web")
    assert resolve_network_plan("segment:db", cfg) == NetworkPlan(mode="segment", segment="db")
    assert resolve_network_plan("host", cfg, allow_host=True) == NetworkPlan(mode="host")


def test_unknown_segment_is_a_load_time_error():
    cfg = parse_network_config(GOOD)
    with pytest.raises(PolicyError) as ei:
        resolve_network_plan("segment:nope", cfg, where="policies/x.yaml: network")
    assert ei.value.errors == ["policies/x.yaml: network.segment: unknown segment 'nope' "
                               "(declared: db, web)"]


def test_host_needs_explicit_permission():
    with pytest.raises(PolicyError, match="needs the policy to allow it explicitly"):
        resolve_network_plan("host", NetworkConfig())


@pytest.mark.parametrize("spec", ["segment", {"segment": "web", "x": 1}, 3, "bridge"])
def test_resolve_rejects_malformed(spec):
    with pytest.raises(PolicyError, match="expected 'none', 'host' or 'segment:NAME'"):
        resolve_network_plan(spec, parse_network_config(GOOD))


def test_check_plan_is_strict():
    cfg = parse_network_config(GOOD)
    assert check_plan(NetworkPlan(), cfg) is None
    assert check_plan(NetworkPlan(mode="segment", segment="db"), cfg).name == "db"
    for bad in (NetworkPlan(mode="segment"), NetworkPlan(mode="bridge"),
                NetworkPlan(mode="none", segment="db"), NetworkPlan(mode="segment", segment="x")):
        with pytest.raises(PlanError):
            check_plan(bad, cfg)


def test_network_plan_round_trips_through_json():
    p = Plan(argv=("/bin/true",), network=NetworkPlan(mode="segment", segment="web"))
    assert Plan.from_json(p.to_json()).network == NetworkPlan(mode="segment", segment="web")


def test_render_ruleset_shape():
    cfg = parse_network_config(GOOD)
    text = nftrules.render(cfg, uplink=True)
    # Atomic replace: declare, delete, define, in one script.
    assert text.startswith("table inet sandboxd\ndelete table inet sandboxd\ntable inet sandboxd {")
    for chain in ("guard_input", "guard_output", "guard_forward"):
        head = text.split(f"chain {chain} {{", 1)[1].split("\n", 2)[1]
        assert head.strip().endswith("policy drop;"), chain
    # db is sbr0 (sorted), web is sbr1; each allowlist chain ends in a counted drop.
    assert 'iifname "sbr1" oifname "up0" jump egress_s1' in text
    web = text.split("chain egress_s1 {", 1)[1].split("\n\t}", 1)[0]
    assert "ip daddr 198.51.100.0/24 tcp dport { 80, 443 } counter name egress_allowed_s1 accept" in web
    assert "ip daddr 198.51.100.53/32 udp dport { 53 } counter name egress_allowed_s1 accept" in web
    assert web.strip().splitlines()[-1].strip() == "counter name egress_dropped_s1 drop"
    db = text.split("chain egress_s0 {", 1)[1].split("\n\t}", 1)[0]
    assert "accept" not in db
    assert 'oifname "up0" masquerade' in text
    # Without an uplink there is no path out at all: no jump to an allowlist, no NAT.
    closed = nftrules.render(cfg, uplink=False)
    assert "up0" not in closed and "masquerade" not in closed


def test_rules_for_picks_one_segment():
    listing = """table inet sandboxd {
	chain guard_forward {
		type filter hook forward priority filter; policy drop;
		iifname "sbr0" oifname "sbr0" accept
		iifname "sbr1" oifname "sbr1" accept
	}
	chain egress_s1 {
		comment "segment web: egress allowlist"
		counter name "egress_dropped_s1" drop
	}
}
"""
    n = nftrules.segment_names(parse_network_config(GOOD))["web"]
    assert nftrules.rules_for(listing, n) == [
        'guard_forward: iifname "sbr1" oifname "sbr1" accept',
        'egress_s1: counter name "egress_dropped_s1" drop']
    assert nftrules.policies(listing) == [
        "guard_forward: type filter hook forward priority filter; policy drop"]


def test_hosts_render_sorted_numerically():
    text = hosts.render("web", [("10.0.0.10", "b"), ("10.0.0.9", "a")]).decode()
    assert text.splitlines()[-2:] == ["10.0.0.9\ta", "10.0.0.10\tb"]
    assert "127.0.0.1\tlocalhost" in text


def test_hosts_rewrite_keeps_inode_and_never_leaves_a_stale_tail(tmp_path):
    p = str(tmp_path / "hosts.web")
    hosts.create(p, "web")
    assert os.stat(p).st_mode & 0o777 == 0o644
    ino = os.stat(p).st_ino
    many = [(f"10.0.0.{i}", f"member{i}") for i in range(2, 40)]
    hosts.rewrite(p, hosts.render("web", many))
    hosts.rewrite(p, hosts.render("web", many[:1]))
    assert os.stat(p).st_ino == ino
    assert open(p).read() == hosts.render("web", many[:1]).decode()
    hosts.create(p, "web")                       # create never clobbers an existing file
    assert "member2" in open(p).read()


def test_manager_rejects_bad_instance_and_config():
    with pytest.raises(PlanError, match="invalid network instance name"):
        NetworkManager("Has_Upper")
    with pytest.raises(PlanError, match="invalid network instance name"):
        NetworkManager("../etc")
    with pytest.raises(PolicyError):
        NetworkManager("x", NetworkConfig(veth_delete_batch=0))


def test_allocation_is_round_robin(tmp_path):
    cfg = parse_network_config({"state_dir": str(tmp_path), "netns_dir": str(tmp_path),
                                "segments": {"s": {"subnet": "10.9.0.0/29"}}})
    m = NetworkManager("alloc", cfg)
    seg = cfg.segment("s")
    got = []
    for _ in range(7):
        got.append(str(m._allocate(seg).ip))
    # .0 network, .1 gateway, .7 broadcast: members cycle over .2-.6, never reusing early.
    assert got == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6",
                   "10.9.0.2", "10.9.0.3"]
    m.close()


def test_freed_addresses_are_quarantined_then_reused_oldest_first(tmp_path):
    from sandboxd.network.manager import _Member
    cfg = parse_network_config({"state_dir": str(tmp_path), "netns_dir": str(tmp_path),
                                "segments": {"s": {"subnet": "10.9.0.0/29"}}})   # .2-.6
    m = NetworkManager("quar", cfg)
    clock = [1000.0]
    m._now = lambda: clock[0]
    seg = cfg.segment("s")
    for off in (2, 4, 6):
        m._members[f"r{off}"] = _Member(f"r{off}", "s", f"n{off}",
                                        __import__("ipaddress").IPv4Interface(f"10.9.0.{off}/29"),
                                        f"sv{off}")
    m._cursor["s"] = 6
    m._freed["s"] = {3: 1000.0, 5: 990.0}        # .5 freed 10 s earlier than .3
    # Everything free is quarantined: the longest-freed address is reused rather than failing.
    assert str(m._allocate(seg).ip) == "10.9.0.5"
    m._members["r5"] = _Member("r5", "s", "n5", __import__("ipaddress").IPv4Interface(
        "10.9.0.5/29"), "sv5")
    clock[0] += 61                                # quarantine of .3 over
    assert str(m._allocate(seg).ip) == "10.9.0.3"
    m._members.clear()
    m._freed["s"] = {3: clock[0]}
    m._cursor["s"] = 2
    # A quarantined address is skipped while a fresh one exists.
    assert str(m._allocate(seg).ip) == "10.9.0.4"
    m.close()


def test_uplink_ifname_fits_ifnamsiz():
    from sandboxd.network.manager import _uplink_ifname
    assert _uplink_ifname("default") == "sbxd-default"
    long = _uplink_ifname("a-rather-long-instance-name")
    assert len(long) == 15 and long.startswith("sbxd")
    assert long != _uplink_ifname("a-rather-long-instance-namf")
