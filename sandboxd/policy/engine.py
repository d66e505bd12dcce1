"""The policy engine: (tenant, request, policies) -> Decision with the resolved Plan.

A pure function of its inputs: no I/O except resolving the real path of a requested bind source,
nothing applied. The request may ask for less than the policy allows, never more; the first field
that asks for more is refused with PermissionDenied naming the field and the bound (`.field` holds
the field). Every value in the plan is noted with where it came from, so `explain` can show why.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

from sandboxd.errors import PermissionDenied
from sandboxd.plan import AppArmorPlan, Bind, LandlockPlan, Limits, NetworkPlan, Plan, UserPlan
from sandboxd.policy.loader import CompiledPolicy, PolicySet, env_name_allowed, is_within
from sandboxd.policy.request import RequestError, RunRequest
from sandboxd.policy.schema import REQUESTABLE_LIMITS, FloatLimit, IntLimit


@dataclass(frozen=True)
class Decision:
    allowed: bool
    tenant: str
    policy: str = ""
    plan: Plan | None = None
    notes: tuple[str, ...] = ()
    denied_field: str = ""
    reason: str = ""
    compiled: CompiledPolicy | None = field(default=None, repr=False, compare=False)


def deny(fld: str, reason: str) -> PermissionDenied:
    e = PermissionDenied(f"{fld}: {reason}", step="authorize")
    e.field = fld            # type: ignore[attr-defined]
    e.reason = reason        # type: ignore[attr-defined]
    return e


def select_policy(policies: PolicySet, tenant: str, asked: str,
                  default_policy: str | None) -> CompiledPolicy:
    names = policies.for_tenant(tenant)
    if not names:
        raise deny("policy", f"no policy applies to tenant '{tenant}' (deny by default)")
    if asked:
        if asked not in names:
            raise deny("policy", f"policy '{asked}' does not apply to tenant '{tenant}' "
                                 f"(its policies: {', '.join(names)})")
        return policies.policies[asked]
    if default_policy and default_policy in names:
        return policies.policies[default_policy]
    if len(names) == 1:
        return policies.policies[names[0]]
    raise RequestError("policy", f"several policies apply to tenant '{tenant}' "
                                 f"({', '.join(names)}) and it has no default_policy: name one")


def decide(policies: PolicySet, tenant: str, req: RunRequest,
           default_policy: str | None = None) -> Decision:
    """Resolve an already validated request. Raises PermissionDenied / RequestError."""
    cp = select_policy(policies, tenant, req.policy, default_policy)
    sp = cp.spec
    pname = sp.name
    notes: list[str] = [f"policy={pname} ({'asked' if req.policy else 'tenant default'})"]

    argv0 = req.argv[0]
    if not any(fnmatch.fnmatchcase(argv0, pat) for pat in sp.commands):
        raise deny("argv[0]", f"{argv0!r} matches none of policy '{pname}' commands "
                              f"({', '.join(sp.commands)})")

    prof = req.seccomp_profile or sp.seccomp.default
    if prof not in cp.seccomp:
        raise deny("seccomp_profile", f"profile '{prof}' is not allowed by policy '{pname}' "
                                      f"(allowed: {', '.join(cp.seccomp)})")
    seccomp = cp.seccomp[prof]
    notes.append(f"seccomp={prof} sha256={seccomp.sha256[:16]}… "
                 f"({'asked' if req.seccomp_profile else 'policy default'})")

    net = req.network or sp.network.default
    if net not in sp.network.allowed:
        raise deny("network", f"mode {net!r} is not allowed by policy '{pname}' "
                              f"(allowed: {', '.join(sp.network.allowed)})")
    notes.append(f"network={net} ({'asked' if req.network else 'policy default'})")

    limits = resolve_limits(cp, req.limits, notes)

    env: dict[str, str] = dict(sp.env.set)
    for name, value in req.env:
        if not env_name_allowed(name, sp.env.allow):
            allow = ", ".join(sp.env.allow) or "nothing"
            raise deny(f"env.{name}", f"not allowed by policy '{pname}' (env.allow: {allow})")
        env[name] = value
    if req.env:
        notes.append(f"env: {len(req.env)} variable(s) from the request")

    binds = list(cp.fs_base.binds)
    for i, ask in enumerate(req.binds):
        binds.append(_resolve_bind(cp, i, ask.source, ask.target, ask.writable))
        notes.append(f"binds[{i}]: {ask.source} -> {ask.target} "
                     f"({'rw' if ask.writable else 'ro'}, asked)")

    fs = sp.filesystem
    cwd = req.cwd or fs.cwd or fs.work_dir
    hostname = fs.hostname
    if net.startswith("segment:"):
        # Members of a segment find each other by name, so each needs its own: the request's
        # label "name" (a DNS label), else a random one.
        asked = dict(req.labels).get("name", "")
        if asked and re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", asked):
            hostname = asked
        else:
            hostname = f"sb-{secrets.token_hex(4)}"
        notes.append(f"hostname={hostname} (segment member name)")
    plan = Plan(
        argv=tuple(req.argv),
        env=tuple(env.items()),
        cwd=cwd,
        hostname=hostname,
        user=UserPlan(inside_uid=sp.user.inside_uid, inside_gid=sp.user.inside_gid,
                      uid_mode=sp.user.uid_mode, allow_single_uid=sp.user.allow_single_uid),
        filesystem=dataclasses.replace(cp.fs_base, binds=tuple(binds), work_host_path=None),
        caps_keep=tuple(sp.capabilities),
        seccomp=seccomp,
        landlock=LandlockPlan(enabled=sp.landlock.enabled, mode=sp.landlock.mode,
                              extra_read=sp.landlock.extra_read, extra_write=sp.landlock.extra_write,
                              tcp_bind=sp.landlock.tcp_bind, tcp_connect=sp.landlock.tcp_connect,
                              scope=sp.landlock.scope),
        apparmor=AppArmorPlan(profile=sp.apparmor.profile, mode=sp.apparmor.mode,
                              required=sp.apparmor.required),
        network=network_plan(net),
        limits=limits,
        output_limit_action=sp.output_limit_action,
    )
    return Decision(True, tenant, pname, plan, tuple(notes), compiled=cp)


def network_plan(mode: str) -> NetworkPlan:
    """The policy's spelling of a mode -> the plan's ("segment:web" -> mode segment, segment web).
    The loader already refused modes and segments the server does not have."""
    if mode.startswith("segment:"):
        return NetworkPlan(mode="segment", segment=mode[len("segment:"):])
    return NetworkPlan(mode=mode)


def resolve_limits(cp: CompiledPolicy, asked: Any, notes: list[str], prefix: str = "") -> Limits:
    sp = cp.spec
    values: dict[str, Any] = {"cpu_extra_ms": sp.limits.cpu_extra_ms, "cpuset": sp.limits.cpuset}
    for name in REQUESTABLE_LIMITS:
        lim: IntLimit | FloatLimit = getattr(sp.limits, name)
        if name in asked:
            v = asked[name]
            if lim.max is not None and v > lim.max:
                raise deny(f"{prefix}limits.{name}", f"asked {_num(v)}, policy '{sp.name}' allows at "
                                                     f"most {_num(lim.max)}")
            values[name] = float(v) if isinstance(lim, FloatLimit) else int(v)
            notes.append(f"{prefix}limits.{name}={_num(v)} (asked; max {_num(lim.max)})")
        else:
            values[name] = lim.default
            notes.append(f"{prefix}limits.{name}={_num(lim.default)} (policy default)")
    return Limits(**values)


def _num(v: Any) -> str:
    return "unlimited" if v is None else str(v)


def _resolve_bind(cp: CompiledPolicy, i: int, source: str, target: str, writable: bool) -> Bind:
    fld = f"binds[{i}]"
    pname = cp.spec.name
    if not cp.spec.binds_allowed:
        raise deny(fld, f"policy '{pname}' allows no binds")
    # Resolve symlinks before comparing, so a link inside an allowed tree that points out of it
    # cannot smuggle another host path in.
    real = os.path.realpath(source)
    reasons = []
    for a in cp.spec.binds_allowed:
        base = os.path.realpath(a.source)
        if not is_within(real, base):
            reasons.append(f"{a.source}: source outside")
            continue
        if not is_within(target, a.target):
            reasons.append(f"{a.source}: target must be within {a.target}")
            continue
        if writable and not a.writable:
            reasons.append(f"{a.source}: read-only")
            continue
        if not os.path.exists(real):
            raise RequestError(f"{fld}.source", f"{source!r} does not exist")
        return Bind(source=real, target=target, writable=writable)
    shown = real if real != source else source
    raise deny(fld, f"{shown!r} -> {target!r}{' (writable)' if writable else ''} is outside what "
                    f"policy '{pname}' allows ({'; '.join(reasons)})")


def explain(policies: PolicySet, tenant: str, req: RunRequest,
            default_policy: str | None = None) -> Decision:
    """Like decide(), but a denial is returned as a Decision rather than raised."""
    try:
        return decide(policies, tenant, req, default_policy)
    except PermissionDenied as e:
        return Decision(False, tenant, _policy_name(policies, tenant, req, default_policy),
                        None, (), getattr(e, "field", ""), getattr(e, "reason", e.message))


def _policy_name(policies: PolicySet, tenant: str, req: RunRequest, default: str | None) -> str:
    try:
        return select_policy(policies, tenant, req.policy, default).spec.name
    except Exception:
        return ""
