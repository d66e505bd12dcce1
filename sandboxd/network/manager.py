"""NetworkManager: segments in a network namespace sandboxd owns; sandboxes attached by veth.

Theory of operation
-------------------
All segment plumbing lives in one network namespace per daemon instance,
`<netns_dir>/sandboxd-<instance>` (the "owned" namespace), created on first need:

    owned netns:  lo   sbr0 (segment a)   sbr1 (segment b)   ...   up0 ──veth──> uplink netns
                         │  └ svN ──veth──> eth0 in a run's netns
                         └ svM ──veth──> eth0 in another run's netns

* One bridge per segment. The bridge holds the segment's gateway address only when the
  segment has egress rules; members get a default route only then.
* One veth per sandbox: created in the owned namespace with its peer created directly in the
  run's namespace as eth0, which is configured there (address, up, default route).
* One nftables table in the owned namespace (nftrules.py) isolates segments from each other
  and from the owned namespace, and lets egress out only through the segment's allowlist,
  masqueraded onto the one veth into the configured uplink namespace.
* Nothing is created or changed in the host's network namespace; a plan pointing attach at
  it (or at the owned/uplink namespace) is refused, and so is an uplink that is the host's.

The launcher is single-threaded and this is its per-run path: no threads and no helper
processes per run (nft runs once, when the owned namespace is built). To talk netlink to a
namespace we step into it with setns(2), open a socket, and step back (nsutil.entered).

Cleanup: every resource registers its release the moment it exists (ExitStack). A crash
leaves at most the pinned owned namespace, the uplink veth and the hosts files; all are found
by name (this instance's) and removed by cleanup_stale(). Destroying the owned namespace
destroys every bridge, veth (both ends) and nft rule in it at once.

Detach disconnects at once (the host-side veth goes down, leaves the bridge and joins a "trash"
link group, ~0.4 ms) and destroys the trashed pairs in batches: a device deletion waits for RCU
grace periods (~25 ms here), and deleting a batch by group costs the same as one. Most pairs
are gone before that anyway: the kernel destroys a veth pair when the run's namespace dies.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import hashlib
import ipaddress
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from sandboxd.errors import LaunchError, PlanError, PolicyError, SandboxError
from sandboxd.plan import NetworkPlan

from . import hosts, nftrules, nsutil
from .config import NetworkConfig, SegmentConfig, check_plan, validate_network_config
from .rtnl import Rtnl

_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_RESERVED_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
TRASH_GROUP = 0x5B0D       # link group of disconnected member veths awaiting batch deletion
SANDBOX_IF = "eth0"
LOOPBACK_IFINDEX = 1       # the kernel always gives lo index 1 in a new namespace


@dataclass
class _Member:
    run_id: str
    segment: str
    name: str
    address: ipaddress.IPv4Interface
    veth: str                # owned-namespace end of the pair; names are never reused


class NetworkManager:
    """Segments for one daemon instance. One per launcher; not thread-safe (none needed)."""

    def __init__(self, instance: str = "default", config: NetworkConfig | None = None) -> None:
        cfg = config or NetworkConfig()
        if not _INSTANCE.match(instance):
            raise PlanError(f"invalid network instance name {instance!r}", step="network.init",
                            hint="[a-z0-9][a-z0-9_-]{0,63}: it names a namespace and files")
        problems = validate_network_config(cfg)
        if problems:
            raise PolicyError("invalid network configuration", errors=problems,
                              step="network.init")
        self.instance = instance
        self.config = cfg
        self.netns_path = os.path.join(cfg.netns_dir, f"sandboxd-{instance}")
        self.state_path = os.path.join(cfg.state_dir, instance, "network")
        self.uplink_ifname = _uplink_ifname(instance)
        self._names = nftrules.segment_names(cfg)
        self._uplink_wanted = cfg.uplink_netns is not None and any(s.egress for s in cfg.segments)
        # The launcher's own namespace: where we return after every setns, and one of the
        # namespaces attach refuses to configure (with init's, the owned and the uplink one).
        self._home_fd = nsutil.open_netns("/proc/thread-self/ns/net")
        self._forbidden = {nsutil.ns_id(self._home_fd)}
        with contextlib.suppress(SandboxError):
            fd = nsutil.open_netns("/proc/1/ns/net")
            self._forbidden.add(nsutil.ns_id(fd))
            os.close(fd)
        self._lock_fd: int | None = None
        self._owned_fd: int | None = None
        self._rt: Rtnl | None = None
        self._bridges: dict[str, int] = {}
        self._listing = ""
        self._members: dict[str, _Member] = {}
        self._cursor: dict[str, int] = {}       # round-robin allocation: last host offset used
        self._freed: dict[str, dict[int, float]] = {}   # segment -> host offset -> when freed
        self._now = time.monotonic
        self._next_veth = 0
        self._trashed = 0
        self._closed = False

    # -- public API ------------------------------------------------------------------------
    def cleanup_stale(self) -> list[str]:
        """Remove what a crashed earlier holder of this instance left; returns what it removed.

        Only this instance's names are touched: the owned namespace, the uplink veth in the
        uplink namespace, the hosts files. Refuses while another live process holds the
        instance (its lock).
        """
        self._check_open()
        self._acquire_lock()
        if self._owned_fd is not None:
            return []                # ours and alive: nothing stale
        removed: list[str] = []
        if os.path.lexists(self.netns_path):
            nsutil.remove_named_netns(self.netns_path, missing_ok=True)
            removed.append(self.netns_path)
        if self.config.uplink_netns and os.path.exists(self.config.uplink_netns):
            # Normally gone with the owned namespace (a veth pair dies with either end); it
            # survives only if something still pins that namespace.
            up_fd = nsutil.open_netns(self.config.uplink_netns)
            try:
                if nsutil.ns_id(up_fd) not in self._forbidden:     # never touch the host's
                    with Rtnl.inside(up_fd, self._home_fd, "uplink netns",
                                     self.config.uplink_netns) as ur:
                        if ur.delete_link_named(self.uplink_ifname):
                            removed.append(f"{self.config.uplink_netns}:{self.uplink_ifname}")
            finally:
                os.close(up_fd)
        for f in sorted(os.listdir(self.state_path)):
            if f.startswith("hosts."):
                os.unlink(os.path.join(self.state_path, f))
                removed.append(os.path.join(self.state_path, f))
        return removed

    def hosts_file(self, segment: str) -> str:
        """Host path of the segment's hosts file (created if missing; updated in place)."""
        self._check_open()
        self.config.segment(segment)
        self._acquire_lock()
        path = self._hosts_path(segment)
        hosts.create(path, segment)
        return path

    def attach(self, run_id: str, netns_path: str, plan: NetworkPlan, name: str = "sandbox"
               ) -> dict[str, Any]:
        """Connect the run's network namespace as the plan says; returns the attestation.

        "none" and "host" need nothing from us and only report. "segment" gives the namespace
        an eth0 on the segment's bridge. Any failure undoes everything this call created.
        """
        self._check_open()
        seg = check_plan(plan, self.config)
        if seg is None:
            return {"mode": plan.mode}
        if run_id in self._members:
            raise PlanError("run is already attached", step="network.attach", path=run_id)
        self._check_name(seg, name)
        self._ensure()
        assert self._rt is not None
        run_fd = nsutil.open_netns(netns_path)
        try:
            if nsutil.ns_id(run_fd) in self._forbidden:
                # A wrong path here would configure the launcher's (the host's) network.
                raise PlanError("refusing to attach a namespace that is not the run's own",
                                step="network.attach", path=netns_path,
                                hint="the runtime must pass the sandbox's fresh network "
                                     "namespace (/proc/<pid>/ns/net after unshare)")
            address = self._allocate(seg)
            veth = f"sv{self._next_veth:x}"
            self._next_veth += 1
            with contextlib.ExitStack() as undo:
                # The netlink socket that configures eth0 must be born in the run's namespace.
                rr = Rtnl.inside(run_fd, self._home_fd, f"run {run_id} netns", netns_path)
                undo.callback(rr.close)
                self._rt.create_veth(veth, SANDBOX_IF, run_fd, master=self._bridges[seg.name])
                undo.callback(self._trash, veth)
                eidx = rr.link_index(SANDBOX_IF)
                if eidx is None:
                    raise LaunchError("the sandbox end of the veth did not appear",
                                      step="network.attach", path=f"{netns_path}:{SANDBOX_IF}")
                rr.set_up(LOOPBACK_IFINDEX, "lo")
                rr.add_address(eidx, SANDBOX_IF, address)
                rr.set_up(eidx, SANDBOX_IF)
                if seg.egress:
                    rr.add_default_route(seg.gateway.ip, eidx, SANDBOX_IF)
                m = _Member(run_id, seg.name, name, address, veth)
                self._members[run_id] = m
                undo.callback(self._members.pop, run_id, None)
                self._write_hosts(seg.name)
                undo.pop_all()
            rr.close()
        finally:
            os.close(run_fd)
        return self._attestation(m, seg)

    def detach(self, run_id: str) -> None:
        """Disconnect the run at once and forget it; idempotent (unknown run_id: no-op).

        If the disconnect itself fails the member is kept (its address stays taken, so it can
        never be handed to another run while the old veth may still be on the bridge) and the
        error raised; detach again, or close(), retries.
        """
        m = self._members.get(run_id)
        if m is None:
            return
        self._trash(m.veth)
        del self._members[run_id]
        net = self.config.segment(m.segment).network
        self._freed.setdefault(m.segment, {})[
            int(m.address.ip) - int(net.network_address)] = self._now()
        self._write_hosts(m.segment)
        if self._trashed >= self.config.veth_delete_batch:
            self.flush()

    def flush(self) -> None:
        """Destroy every detached member's veth pair now (one kernel batch)."""
        if self._rt is None or self._trashed == 0:
            return
        self._rt.delete_group(TRASH_GROUP)
        self._trashed = 0

    def counters(self) -> dict[str, Any]:
        """Filter counters: per segment egress allowed/dropped, and the global drop counters."""
        self._check_open()
        names = {"segments": {s.name: {} for s in self.config.segments}}
        if self._owned_fd is None:
            return names
        with nsutil.entered(self._owned_fd, self._home_fd, self.netns_path):
            raw = nftrules.counters()
        out: dict[str, Any] = {"segments": {}}
        for seg, n in self._names.items():
            out["segments"][seg] = {"egress_allowed": raw.get(n.allowed, {}),
                                    "egress_dropped": raw.get(n.dropped, {})}
        for k in ("input_dropped", "forward_dropped", "spoof_dropped"):
            out[k] = raw.get(k, {})
        return out

    def members(self, segment: str | None = None) -> list[dict[str, str]]:
        return [{"run_id": m.run_id, "segment": m.segment, "name": m.name,
                 "address": str(m.address)}
                for m in self._members.values() if segment in (None, m.segment)]

    @property
    def owned_netns_fd(self) -> int | None:
        """fd of the owned namespace (tests step into it); None until first needed."""
        return self._owned_fd

    def close(self) -> None:
        """Destroy the owned namespace (every member's veth with it); leaves nothing behind."""
        if self._closed:
            return
        errors: list[BaseException] = []
        self._members.clear()
        try:
            self._destroy_owned()
        except SandboxError as e:
            errors.append(e)
        if os.path.isdir(self.state_path):
            for f in os.listdir(self.state_path):
                if f.startswith("hosts."):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.state_path, f))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        os.close(self._home_fd)
        self._closed = True
        _raise_all(errors)

    def __enter__(self) -> "NetworkManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the owned namespace ---------------------------------------------------------------
    def _ensure(self) -> None:
        """Build the owned namespace, its filter, bridges and uplink, once."""
        if self._owned_fd is not None:
            return
        self._acquire_lock()
        os.makedirs(self.config.netns_dir, mode=0o755, exist_ok=True)
        with contextlib.ExitStack() as undo:
            fd = nsutil.create_named_netns(self.netns_path, self._home_fd)
            self._owned_fd = fd
            self._forbidden.add(nsutil.ns_id(fd))
            undo.callback(self._destroy_owned)
            with nsutil.entered(fd, self._home_fd, self.netns_path):
                # Before any interface exists, so none of ours ever gets an IPv6 address.
                for k in ("all", "default"):
                    nsutil.write_sysctl(f"net/ipv6/conf/{k}/disable_ipv6", "1")
                    # Drop packets whose source could not be routed back the way they came.
                    nsutil.write_sysctl(f"net/ipv4/conf/{k}/rp_filter", "1")
                    # Answer ARP only for addresses of the asking interface: a member must not
                    # learn another segment's gateway address.
                    nsutil.write_sysctl(f"net/ipv4/conf/{k}/arp_ignore", "1")
                    nsutil.write_sysctl(f"net/ipv4/conf/{k}/send_redirects", "0")
                # Bridged (intra-segment) traffic stays at layer 2: with br_netfilter these
                # would show it to the IP forward hook, whose default is drop.
                for k in ("iptables", "ip6tables", "arptables"):
                    nsutil.write_sysctl(f"net/bridge/bridge-nf-call-{k}", "0", missing_ok=True)
                # The filter goes in before any link exists: no packet ever passes unfiltered.
                nftrules.apply(self.config, uplink=self._uplink_wanted)
                self._listing = nftrules.read_back()
                self._rt = Rtnl.here("sandboxd netns")
            self._rt.set_up(LOOPBACK_IFINDEX, "lo")
            for s in self.config.segments:
                br = self._names[s.name].bridge
                idx = self._rt.create_bridge(br)
                if s.egress:
                    self._rt.add_address(idx, br, s.gateway)
                self._bridges[s.name] = idx
            if self._uplink_wanted:
                self._build_uplink()
                with nsutil.entered(fd, self._home_fd, self.netns_path):
                    nsutil.write_sysctl("net/ipv4/ip_forward", "1")
            undo.pop_all()

    def _build_uplink(self) -> None:
        """The one link out: veth up0 (owned) <-> sbxd-<instance> (uplink netns)."""
        assert self._rt is not None and self.config.uplink_netns
        up_fd = nsutil.open_netns(self.config.uplink_netns)
        try:
            if nsutil.ns_id(up_fd) in self._forbidden:
                raise PlanError("the uplink namespace is the host's own", step="network.uplink",
                                path=self.config.uplink_netns,
                                hint="the host's network configuration is never modified: give "
                                     "a dedicated namespace (routed or NATed onward by its owner)")
            self._forbidden.add(nsutil.ns_id(up_fd))
            net = ipaddress.IPv4Network(self.config.uplink_subnet)
            outside = ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")
            inside = ipaddress.IPv4Interface(f"{net.network_address + 2}/{net.prefixlen}")
            idx = self._rt.create_veth(nftrules.UPLINK_IF, self.uplink_ifname, up_fd)
            with Rtnl.inside(up_fd, self._home_fd, "uplink netns", self.config.uplink_netns) as ur:
                pidx = ur.link_index(self.uplink_ifname)
                if pidx is None:
                    raise LaunchError("uplink veth did not appear", step="network.uplink",
                                      path=f"{self.config.uplink_netns}:{self.uplink_ifname}")
                ur.add_address(pidx, self.uplink_ifname, outside)
                ur.set_up(pidx, self.uplink_ifname)
            self._rt.add_address(idx, nftrules.UPLINK_IF, inside)
            self._rt.add_default_route(outside.ip, idx, nftrules.UPLINK_IF)
        finally:
            os.close(up_fd)

    def _destroy_owned(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd = None
        self._bridges.clear()
        self._trashed = 0
        nsutil.remove_named_netns(self.netns_path, missing_ok=True)

    # -- members ---------------------------------------------------------------------------
    def _check_name(self, seg: SegmentConfig, name: str) -> None:
        if not _HOSTNAME.match(name) or name.lower() in _RESERVED_NAMES:
            raise PlanError(f"{name!r} is not a usable host name on a segment",
                            step="network.attach",
                            hint="one DNS label: letters, digits, '-', at most 63")
        for m in self._members.values():
            if m.segment == seg.name and m.name.lower() == name.lower():
                # Two members under one name would make name resolution pick one silently.
                raise PlanError(f"name {name!r} is already used on segment {seg.name!r} "
                                f"(by run {m.run_id})", step="network.attach",
                                hint="give each sandbox on a segment its own hostname")

    def _allocate(self, seg: SegmentConfig) -> ipaddress.IPv4Interface:
        """Next free member address: round-robin, and a freed address only after a quarantine.

        Peers and the gateway keep a freed address's old MAC in their neighbour caches for up
        to ~50 s (reachable 15-45 s, then delay and probes), and a gratuitous ARP from a new
        veth is usually lost before its queue is up; so a fresh address must not be one of
        those. When every free address is quarantined, the longest-freed one is reused.
        """
        net = seg.network
        first, last = 2, net.num_addresses - 2          # .0 network, .1 gateway, last broadcast
        used = {int(m.address.ip) - int(net.network_address)
                for m in self._members.values() if m.segment == seg.name}
        freed = self._freed.setdefault(seg.name, {})
        horizon = self._now() - self.config.address_quarantine_s
        for off in [o for o, t in freed.items() if t <= horizon]:
            del freed[off]                               # quarantine over: plain free address
        start = self._cursor.get(seg.name, first - 1)
        size = last - first + 1
        fallback: int | None = None
        for i in range(1, size + 1):
            off = first + (start - first + i) % size
            if off in used:
                continue
            if off in freed:
                if fallback is None or freed[off] < freed[fallback]:
                    fallback = off
                continue
            break
        else:
            if fallback is None:
                raise LaunchError(f"segment {seg.name!r} is full ({size} members)",
                                  step="network.allocate",
                                  hint="a larger subnet in the network config")
            off = fallback
        freed.pop(off, None)
        self._cursor[seg.name] = off
        return ipaddress.IPv4Interface(f"{net.network_address + off}/{net.prefixlen}")

    def _trash(self, name: str) -> None:
        assert self._rt is not None
        self._rt.disconnect(name, TRASH_GROUP)
        self._trashed += 1

    def _hosts_path(self, segment: str) -> str:
        os.makedirs(self.state_path, mode=0o755, exist_ok=True)
        return os.path.join(self.state_path, f"hosts.{segment}")

    def _write_hosts(self, segment: str) -> None:
        path = self._hosts_path(segment)
        hosts.create(path, segment)
        members = [(str(m.address.ip), m.name) for m in self._members.values()
                   if m.segment == segment]
        hosts.rewrite(path, hosts.render(segment, members))

    def _attestation(self, m: _Member, seg: SegmentConfig) -> dict[str, Any]:
        n = self._names[seg.name]
        return {
            "mode": "segment",
            "segment": seg.name,
            "interface": SANDBOX_IF,
            "address": str(m.address),
            "gateway": str(seg.gateway.ip) if seg.egress else None,
            "hostname": m.name,
            "hosts_file": self._hosts_path(seg.name),
            "egress": [{"cidr": r.cidr, "protocol": r.protocol, "ports": sorted(set(r.ports))}
                       for r in seg.egress],
            "filter": {
                "netns": self.netns_path,
                "table": f"{nftrules.FAMILY} {nftrules.TABLE}",
                "sha256": nftrules.digest(self._listing),
                "policies": nftrules.policies(self._listing),
                "rules": nftrules.rules_for(self._listing, n),
            },
        }

    # -- bookkeeping -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise PlanError("network manager is closed", step="network")

    def _acquire_lock(self) -> None:
        """One live manager per instance: a second launcher would tear down the first's."""
        if self._lock_fd is not None:
            return
        os.makedirs(self.state_path, mode=0o755, exist_ok=True)
        path = os.path.join(self.state_path, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LaunchError(f"network instance {self.instance!r} is in use"
                              f"{' by pid ' + holder if holder else ''}", step="network.lock",
                              path=path, errno=e.errno if e.errno != _errno.EAGAIN else None,
                              hint="one launcher per instance; use another instance name"
                              ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd


def _uplink_ifname(instance: str) -> str:
    """Our interface name in the uplink namespace: readable when it fits IFNAMSIZ (15)."""
    name = f"sbxd-{instance}"
    if len(name) <= 15:
        return name
    return "sbxd" + hashlib.sha256(instance.encode()).hexdigest()[:11]


def _raise_all(errors: list[BaseException]) -> None:
    """Raise the first error with the others attached as notes (none is swallowed)."""
    if not errors:
        return
    first = errors[0]
    for e in errors[1:]:
        first.add_note(f"also: {e}")
    raise first
