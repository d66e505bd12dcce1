"""The packet filter of sandboxd's own network namespace, as one nftables table.

`render` is a pure function of the configuration (tested without root); `apply` loads it with
one `nft -f -` inside the owned namespace, atomically replacing any earlier version of the
table; `read_back` lists what the kernel actually holds, for the attestation; `counters`
reads the named counters.

Layout, in the owned namespace only (the host's tables are never touched):
  * every segment is a bridge `sbrN`; members reach each other at layer 2 on it;
  * nothing reaches the owned namespace itself (input: drop), so the gateway address answers
    ARP and routes, and nothing else;
  * forwarding is drop by default: a packet may only go from a segment's bridge to the uplink
    and only through that segment's allowlist chain, where anything unmatched is counted and
    dropped; replies come back by conntrack state;
  * egress is masqueraded to the uplink address, so the outside sees one address.
IPv6 is disabled in the owned namespace (sysctl) and dropped here too, by the inet policies.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass

from sandboxd.errors import HostCapabilityError, LaunchError

from .config import NetworkConfig

TABLE = "sandboxd"
FAMILY = "inet"
UPLINK_IF = "up0"


@dataclass(frozen=True)
class SegmentNames:
    """Kernel-side names of one segment: its bridge, its allowlist chain, its counters."""

    index: int
    bridge: str
    chain: str
    allowed: str
    dropped: str


def segment_names(cfg: NetworkConfig) -> dict[str, SegmentNames]:
    # Index-based names: segment names may be longer than IFNAMSIZ allows, and the owned
    # namespace is private, so short names cannot clash with anything.
    return {s.name: SegmentNames(i, f"sbr{i}", f"egress_s{i}", f"egress_allowed_s{i}",
                                 f"egress_dropped_s{i}")
            for i, s in enumerate(cfg.segments)}


def render(cfg: NetworkConfig, uplink: bool) -> str:
    """The whole table as an nft script; loading it replaces the previous table atomically."""
    names = segment_names(cfg)
    out: list[str] = []
    w = out.append
    # "table ...; delete table ...; table {...}" in one transaction: replace or create, atomically.
    w(f"table {FAMILY} {TABLE}")
    w(f"delete table {FAMILY} {TABLE}")
    w(f"table {FAMILY} {TABLE} {{")
    w('\tcounter input_dropped { comment "packets to sandboxd\'s own namespace" }')
    w('\tcounter forward_dropped { comment "between segments, or in from the uplink" }')
    w('\tcounter spoof_dropped { comment "source address outside the sender\'s segment" }')
    for s in cfg.segments:
        n = names[s.name]
        w(f'\tcounter {n.allowed} {{ comment "segment {s.name}: egress let out" }}')
        w(f'\tcounter {n.dropped} {{ comment "segment {s.name}: egress not allowed" }}')
    w("")
    w("\tchain guard_prerouting {")
    w("\t\ttype filter hook prerouting priority raw; policy accept;")
    for s in cfg.segments:
        n = names[s.name]
        # Threat: a member forging a source address outside its segment, to be taken for
        # another segment's member or to slip past per-segment accounting.
        w(f'\t\tiifname "{n.bridge}" ip saddr != {s.subnet} counter name spoof_dropped drop')
        # Threat: IPv6 (link-local needs no configuration) as a way around IPv4 rules.
        w(f'\t\tiifname "{n.bridge}" meta nfproto ipv6 counter name spoof_dropped drop')
    w("\t}")
    w("")
    w("\tchain guard_input {")
    w("\t\ttype filter hook input priority filter; policy drop;")
    w('\t\tiifname "lo" accept')
    # Threat: a sandbox reaching sandboxd's own namespace (the gateway address is there):
    # any service or stack bug in it would be a way out of the segment.
    w("\t\tcounter name input_dropped drop")
    w("\t}")
    w("")
    w("\tchain guard_output {")
    w("\t\ttype filter hook output priority filter; policy drop;")
    # Nothing in the owned namespace originates traffic (no redirects, no probes).
    w('\t\toifname "lo" accept')
    w("\t}")
    w("")
    w("\tchain guard_forward {")
    w("\t\ttype filter hook forward priority filter; policy drop;")
    for s in cfg.segments:
        n = names[s.name]
        # Members of one segment talk freely; this only matters if br_netfilter shows bridged
        # packets to this hook (we turn that off, see manager), so it must not break them.
        w(f'\t\tiifname "{n.bridge}" oifname "{n.bridge}" accept')
    if uplink:
        # Replies to connections an allowlist let out. Nothing may *start* from the uplink.
        w(f'\t\tiifname "{UPLINK_IF}" ct state established,related accept')
        w("\t\tct state invalid counter name forward_dropped drop")
        for s in cfg.segments:
            n = names[s.name]
            w(f'\t\tiifname "{n.bridge}" oifname "{UPLINK_IF}" jump {n.chain}')
    # Threat: segment A reaching segment B (both bridges are in this namespace and it
    # routes), and the outside reaching into a segment.
    w("\t\tcounter name forward_dropped drop")
    w("\t}")
    for s in cfg.segments:
        n = names[s.name]
        w("")
        w(f"\tchain {n.chain} {{")
        w(f'\t\tcomment "segment {s.name}: egress allowlist"')
        for r in s.egress:
            ports = ", ".join(str(p) for p in sorted(set(r.ports)))
            w(f"\t\tip daddr {r.cidr} {r.protocol} dport {{ {ports} }} "
              f"counter name {n.allowed} accept")
        # Threat: exfiltration or attacks on anything the policy did not list.
        w(f"\t\tcounter name {n.dropped} drop")
        w("\t}")
    if uplink:
        w("")
        w("\tchain nat_postrouting {")
        w("\t\ttype nat hook postrouting priority srcnat; policy accept;")
        # The outside sees the uplink address only: segment layout and members stay private,
        # and the uplink namespace needs no routes back to the segments.
        w(f'\t\toifname "{UPLINK_IF}" masquerade')
        w("\t}")
    w("}")
    return "\n".join(out) + "\n"


def _nft() -> str:
    exe = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if not exe:
        raise HostCapabilityError("the nft tool is not installed", step="network.nft",
                                  hint="apt-get install nftables (scripts/setup.sh does)")
    return exe


def run_nft(args: list[str], script: str | None = None, step: str = "network.nft") -> str:
    """Run nft in the *current* network namespace (callers step in with nsutil.entered).

    Only when the owned namespace is built and when counters are read: never per run.
    """
    import subprocess   # not at import time: the launcher keeps subprocess off its hot path
    try:
        p = subprocess.run([_nft(), *args], input=script, capture_output=True, text=True,
                           timeout=30, close_fds=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"nft failed to run: {e}", step=step,
                          errno=getattr(e, "errno", None)) from None
    if p.returncode != 0:
        raise LaunchError(f"nft {' '.join(args)} failed: {p.stderr.strip()[:2000]}", step=step)
    return p.stdout


def apply(cfg: NetworkConfig, uplink: bool) -> None:
    run_nft(["-f", "-"], render(cfg, uplink), step="network.nft_apply")


def read_back() -> str:
    """The table as the kernel holds it (text form), for the attestation."""
    return run_nft(["list", "table", FAMILY, TABLE], step="network.nft_read_back")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rules_for(listing: str, seg: SegmentNames) -> list[str]:
    """The rules of a listing that concern one segment: its allowlist chain and its bridge."""
    rules: list[str] = []
    chain: str | None = None
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("chain "):
            chain = line.split()[1]
            continue
        if line == "}":
            chain = None
            continue
        if chain is None or not line or line.startswith(("type ", "comment ")):
            continue
        if chain == seg.chain or f'"{seg.bridge}"' in line:
            rules.append(f"{chain}: {line}")
    return rules


def policies(listing: str) -> list[str]:
    """The base chains and their policies ("guard_forward: policy drop")."""
    out = []
    chain = None
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("chain "):
            chain = line.split()[1]
        elif line.startswith("type ") and chain:
            out.append(f"{chain}: {line.rstrip(';')}")
    return out


def counters() -> dict[str, dict[str, int]]:
    """name -> {"packets", "bytes"} for every counter of the table."""
    text = run_nft(["-j", "list", "counters", "table", FAMILY, TABLE],
                   step="network.nft_counters")
    out: dict[str, dict[str, int]] = {}
    for item in json.loads(text).get("nftables", []):
        c = item.get("counter")
        if c and c.get("table") == TABLE:
            out[c["name"]] = {"packets": int(c.get("packets", 0)), "bytes": int(c.get("bytes", 0))}
    return out
