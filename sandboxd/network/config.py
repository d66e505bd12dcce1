"""Network configuration: segments, their egress allowlists, the uplink. Parse, validate, resolve.

The daemon's configuration declares the segments (a name, an IPv4 subnet, an egress
allowlist) and where egress leaves to (the uplink network namespace). Policies only name a
segment; `resolve_network_plan` turns a policy's network setting into the plan's NetworkPlan
and refuses, at load time, a segment the configuration does not declare.

Nothing here touches the kernel: these are pure functions, tested without root.

Configuration form (a mapping, e.g. from YAML)::

    uplink:                       # optional; without it no segment may have egress rules
      netns: /run/netns/outside   # network namespace file egress leaves into
      subnet: 169.254.231.0/30    # transfer net of the one link into it (default shown)
    segments:
      web:
        subnet: 10.200.1.0/24
        egress:
          - {cidr: 198.51.100.0/24, ports: [443], protocol: tcp}
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Mapping

from sandboxd.errors import PlanError, PolicyError
from sandboxd.plan import NetworkPlan

MODES = ("none", "segment", "host")
PROTOCOLS = ("tcp", "udp")
_SEGMENT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# Addresses a segment or the uplink may never use: they mean something else to every stack.
_RESERVED = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"))
DEFAULT_UPLINK_SUBNET = "169.254.231.0/30"


@dataclass(frozen=True)
class EgressRule:
    """One allowlist entry: traffic from a segment to `cidr` on these ports is let out."""

    cidr: str                    # IPv4 network, host bits zero ("198.51.100.0/24", "0.0.0.0/0")
    ports: tuple[int, ...]       # destination ports, 1..65535; never empty (no "any port")
    protocol: str = "tcp"        # "tcp" or "udp"


@dataclass(frozen=True)
class SegmentConfig:
    """A named segment: one bridge in sandboxd's namespace, one IPv4 subnet."""

    name: str                    # [a-z][a-z0-9-]{0,30}; what policies name
    subnet: str                  # IPv4 network, /16../29. First host: the gateway; the rest: members
    egress: tuple[EgressRule, ...] = ()   # empty: no route out at all (the safe default)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        net = self.network
        return ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")


@dataclass(frozen=True)
class NetworkConfig:
    """Everything the NetworkManager needs to build segments. Defaults: no segments, no egress."""

    segments: tuple[SegmentConfig, ...] = ()
    # Network namespace file egress leaves into (one veth into it). None: no egress anywhere.
    uplink_netns: str | None = None
    # Transfer net of that veth: the uplink side takes the first host, sandboxd's side the second.
    uplink_subnet: str = DEFAULT_UPLINK_SUBNET
    # Where the owned namespace is pinned (`ip netns` looks here) and where hosts files live.
    netns_dir: str = "/run/netns"
    state_dir: str = "/run/sandboxd"
    # Detached sandboxes' veths are disconnected at once and destroyed in batches of this many:
    # destroying a device waits for RCU grace periods (~25 ms here), one batch costs the same.
    veth_delete_batch: int = 16
    # Seconds a detached member's address is not handed out again while others are free:
    # neighbour caches (peers', the gateway's) hold its old MAC for up to ~50 s.
    address_quarantine_s: float = 60.0

    def segment(self, name: str) -> SegmentConfig:
        for s in self.segments:
            if s.name == name:
                return s
        raise PlanError(f"unknown network segment {name!r}", step="network.resolve",
                        hint=f"declared segments: {', '.join(self.segment_names()) or 'none'}")

    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]


# -- parse + validate ------------------------------------------------------------------------

def parse_network_config(data: Mapping[str, Any] | None, source: str = "<config>"
                         ) -> NetworkConfig:
    """Build a NetworkConfig from a mapping; report every problem at once (PolicyError.errors).

    Each error is "SOURCE: key.path: reason". Unknown keys are errors.
    """
    errors: list[str] = []

    def err(path: str, why: str) -> None:
        errors.append(f"{source}: {path}: {why}")

    data = dict(data or {})
    _unknown(data, {"uplink", "segments", "netns_dir", "state_dir", "veth_delete_batch",
                    "address_quarantine_s"}, "network", err)
    kw: dict[str, Any] = {}
    up = data.get("uplink")
    if up is not None:
        if not isinstance(up, Mapping):
            err("network.uplink", "must be a mapping")
        else:
            _unknown(up, {"netns", "subnet"}, "network.uplink", err)
            ns = up.get("netns")
            if not isinstance(ns, str) or not ns.startswith("/"):
                err("network.uplink.netns", "must be an absolute path to a network namespace file")
            else:
                kw["uplink_netns"] = ns
            if "subnet" in up:
                kw["uplink_subnet"] = str(up["subnet"])
    for key in ("netns_dir", "state_dir"):
        if key in data:
            if not isinstance(data[key], str) or not data[key].startswith("/"):
                err(f"network.{key}", "must be an absolute path")
            else:
                kw[key] = data[key]
    for key in ("veth_delete_batch", "address_quarantine_s"):
        if key in data:
            kw[key] = data[key]

    segs = data.get("segments") or {}
    segments: list[SegmentConfig] = []
    if not isinstance(segs, Mapping):
        err("network.segments", "must be a mapping of segment name to settings")
        segs = {}
    for name in sorted(segs, key=str):
        body = segs[name]
        path = f"network.segments.{name}"
        if not isinstance(body, Mapping):
            err(path, "must be a mapping with 'subnet' and optional 'egress'")
            continue
        _unknown(body, {"subnet", "egress"}, path, err)
        rules: list[EgressRule] = []
        egress = body.get("egress") or []
        if not isinstance(egress, list):
            err(f"{path}.egress", "must be a list of {cidr, ports, protocol}")
            egress = []
        for i, r in enumerate(egress):
            rpath = f"{path}.egress[{i}]"
            if not isinstance(r, Mapping):
                err(rpath, "must be a mapping {cidr, ports, protocol}")
                continue
            _unknown(r, {"cidr", "ports", "protocol"}, rpath, err)
            ports = r.get("ports")
            if not isinstance(ports, list) or not all(isinstance(p, int) for p in ports):
                err(f"{rpath}.ports", "must be a list of port numbers")
                ports = []
            rules.append(EgressRule(cidr=str(r.get("cidr", "")), ports=tuple(ports),
                                    protocol=str(r.get("protocol", "tcp"))))
        segments.append(SegmentConfig(name=str(name), subnet=str(body.get("subnet", "")),
                                      egress=tuple(rules)))
    cfg = NetworkConfig(segments=tuple(segments), **kw)
    errors.extend(f"{source}: {e}" for e in validate_network_config(cfg))
    if errors:
        raise PolicyError(f"{source}: invalid network configuration ({len(errors)} problems)",
                          errors=errors, step="network.config")
    return cfg


def validate_network_config(cfg: NetworkConfig) -> list[str]:
    """Every cross-field problem of a config, as "key.path: reason" strings (empty: valid)."""
    errors: list[str] = []
    uplink = _net(cfg.uplink_subnet, "network.uplink.subnet", errors, min_prefix=16, max_prefix=30)
    seen: dict[str, ipaddress.IPv4Network] = {}
    for s in cfg.segments:
        path = f"network.segments.{s.name}"
        if not _SEGMENT_NAME.match(s.name):
            errors.append(f"{path}: segment names are [a-z][a-z0-9-]{{0,30}}")
        if s.name in seen:
            errors.append(f"{path}: declared twice")
        net = _net(s.subnet, f"{path}.subnet", errors, min_prefix=16, max_prefix=29)
        if net is not None:
            # Overlapping segments would share addresses and make "which segment" ambiguous
            # to the filter, which matches on the bridge but routes on the address.
            for other, onet in seen.items():
                if onet is not None and net.overlaps(onet):
                    errors.append(f"{path}.subnet: {net} overlaps segment {other!r} ({onet})")
            if uplink is not None and net.overlaps(uplink):
                errors.append(f"{path}.subnet: {net} overlaps the uplink subnet {uplink}")
        seen[s.name] = net  # type: ignore[assignment]
        if s.egress and cfg.uplink_netns is None:
            errors.append(f"{path}.egress: egress rules need network.uplink.netns "
                          "(there is nowhere for traffic to leave to)")
        for i, r in enumerate(s.egress):
            rpath = f"{path}.egress[{i}]"
            _net(r.cidr, f"{rpath}.cidr", errors, min_prefix=0, max_prefix=32, reserved_ok=True)
            if r.protocol not in PROTOCOLS:
                errors.append(f"{rpath}.protocol: {r.protocol!r} is not one of {', '.join(PROTOCOLS)}")
            if not r.ports:
                errors.append(f"{rpath}.ports: must name at least one port (there is no 'any')")
            for p in r.ports:
                if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
                    errors.append(f"{rpath}.ports: {p!r} is not a port number 1..65535")
    if not isinstance(cfg.veth_delete_batch, int) or not 1 <= cfg.veth_delete_batch <= 1024:
        errors.append("network.veth_delete_batch: must be an integer 1..1024")
    q = cfg.address_quarantine_s
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 3600:
        errors.append("network.address_quarantine_s: must be a number of seconds 0..3600")
    return errors


def _unknown(d: Mapping[str, Any], allowed: set[str], path: str, err) -> None:
    for k in d:
        if k not in allowed:
            err(f"{path}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _net(text: str, path: str, errors: list[str], *, min_prefix: int, max_prefix: int,
         reserved_ok: bool = False) -> ipaddress.IPv4Network | None:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        errors.append(f"{path}: {text!r} is not a network ({e})")
        return None
    if net.version != 4:
        errors.append(f"{path}: {text} is IPv6; segments and egress are IPv4 only "
                      "(IPv6 is dropped everywhere, see docs/network.md)")
        return None
    if not min_prefix <= net.prefixlen <= max_prefix:
        errors.append(f"{path}: prefix /{net.prefixlen} is outside /{min_prefix}../{max_prefix}")
    if not reserved_ok:
        for r in _RESERVED:
            if net.overlaps(r):
                errors.append(f"{path}: {net} overlaps reserved {r}")
    return net


# -- resolve: policy setting -> NetworkPlan ----------------------------------------------------

def resolve_network_plan(spec: Any, cfg: NetworkConfig, *, allow_host: bool = False,
                         where: str = "network") -> NetworkPlan:
    """Turn a policy's `network:` value into a NetworkPlan; unknown segments are errors here.

    spec: "none", "host", "segment:NAME" (the policy schema's form) or {"segment": NAME}.
    `allow_host` is the policy's explicit permission for the host's network; without it
    "host" is refused.
    """
    if isinstance(spec, str) and spec.startswith("segment:"):
        spec = {"segment": spec[len("segment:"):]}
    if spec is None or spec == "none":
        return NetworkPlan(mode="none")
    if spec == "host":
        if not allow_host:
            raise PolicyError(f"{where}: 'host' network needs the policy to allow it explicitly",
                              errors=[f"{where}: host network not allowed by this policy"],
                              step="network.resolve",
                              hint="the host's network shares every host service with the sandbox")
        return NetworkPlan(mode="host")
    if isinstance(spec, Mapping) and set(spec) == {"segment"}:
        name = spec["segment"]
        if name not in cfg.segment_names():
            known = ", ".join(cfg.segment_names()) or "none"
            raise PolicyError(f"{where}.segment: unknown network segment {name!r}",
                              errors=[f"{where}.segment: unknown segment {name!r} "
                                      f"(declared: {known})"],
                              step="network.resolve")
        return NetworkPlan(mode="segment", segment=name)
    raise PolicyError(f"{where}: expected 'none', 'host' or 'segment:NAME', got {spec!r}",
                      errors=[f"{where}: invalid value {spec!r}"], step="network.resolve")


def check_plan(plan: NetworkPlan, cfg: NetworkConfig) -> SegmentConfig | None:
    """The launcher's own check of a plan against the config it runs with (PlanError if not)."""
    if plan.mode not in MODES:
        raise PlanError(f"unknown network mode {plan.mode!r}", step="network.check_plan",
                        hint=f"one of {', '.join(MODES)}")
    if plan.mode == "segment":
        if not plan.segment:
            raise PlanError("network mode 'segment' without a segment name",
                            step="network.check_plan")
        return cfg.segment(plan.segment)
    if plan.segment is not None:
        raise PlanError(f"network mode {plan.mode!r} names a segment ({plan.segment!r})",
                        step="network.check_plan")
    return None
