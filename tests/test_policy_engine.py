"""The policy engine: request + policy -> Plan, and what a request may not ask for."""

from __future__ import annotations

import os
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxd.errors import PermissionDenied
from sandboxd.plan import Plan
from sandboxd.policy.engine import decide, explain
from sandboxd.policy.loader import LoadContext, load_policy_texts
from sandboxd.policy.request import (BindAsk, InputFile, RequestBounds, RequestError, RunRequest,
                                     validate_request)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILES = os.path.join(ROOT, "profiles")
B = RequestBounds()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "allowed").mkdir()
    (d / "allowed" / "f.txt").write_text("x")
    (d / "secret").mkdir()
    os.symlink(str(d / "secret"), str(d / "allowed" / "escape"))
    return d


@pytest.fixture(scope="module")
def policies(data_dir):
    svc = textwrap.dedent(f"""\
        version: 1
        name: svc
        tenants: [alice, bob]
        commands: ["/bin/*", "/usr/bin/*", "./*"]
        seccomp: {{default: default, allowed: [judge]}}
        env: {{set: {{PATH: /usr/bin:/bin, HOME: /box}}, allow: [LANG, "LC_*"]}}
        binds_allowed:
          - {{source: {data_dir}/allowed, target: /data, writable: false}}
        limits:
          cpu_time_ms: {{default: 1000, max: 5000}}
          memory_bytes: {{default: 64Mi, max: 256Mi}}
          cpu_quota: {{default: 1.0, max: 2.0}}
        """)
    other = textwrap.dedent("""\
        version: 1
        name: other
        tenants: [bob]
        seccomp: {default: judge}
        """)
    return load_policy_texts([("svc.yaml", svc), ("other.yaml", other)],
                             LoadContext(profile_dir=PROFILES))


def req(*argv: str, **kw) -> RunRequest:
    return RunRequest(argv=argv or ("/bin/true",), **kw)


def denied(policies, r, tenant="alice", default=None) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as ei:
        decide(policies, tenant, r, default)
    return ei.value


def test_defaults_fill_the_plan_and_are_noted(policies):
    d = decide(policies, "alice", req("/bin/echo", "hi"))
    p = d.plan
    assert d.allowed and d.policy == "svc"
    assert p.argv == ("/bin/echo", "hi")
    assert p.limits.cpu_time_ms == 1000 and p.limits.memory_bytes == 64 << 20
    assert p.seccomp.name == "default" and len(p.seccomp.sha256) == 64
    assert p.network.mode == "none" and p.caps_keep == ()
    assert p.filesystem.work_host_path is None and p.cwd == "/box"
    assert "limits.memory_bytes=67108864 (policy default)" in d.notes
    # The plan round-trips through its JSON form, which is what Explain returns.
    assert Plan.from_json(p.to_json()) == p


def test_asking_for_less_is_granted(policies):
    d = decide(policies, "alice", req(limits={"memory_bytes": 32 << 20, "cpu_time_ms": 10}))
    assert d.plan.limits.memory_bytes == 32 << 20 and d.plan.limits.cpu_time_ms == 10
    assert "limits.memory_bytes=33554432 (asked; max 268435456)" in d.notes


def test_asking_for_more_names_the_field_and_the_bound(policies):
    e = denied(policies, req(limits={"memory_bytes": 1 << 30}))
    assert e.field == "limits.memory_bytes"
    assert str(e) == ("authorize: limits.memory_bytes: asked 1073741824, policy 'svc' allows at "
                      "most 268435456")
    e = denied(policies, req(limits={"cpu_quota": 3.5}))
    assert e.field == "limits.cpu_quota" and "at most 2.0" in str(e)


def test_deny_by_default_for_a_tenant_without_policy(policies):
    e = denied(policies, req(), tenant="mallory")
    assert e.field == "policy" and "no policy applies to tenant 'mallory' (deny by default)" in str(e)


def test_policy_selection(policies):
    e = denied(policies, req(policy="other"), tenant="alice")
    assert "policy 'other' does not apply to tenant 'alice' (its policies: svc)" in str(e)
    with pytest.raises(RequestError) as ei:
        decide(policies, "bob", req())
    assert "several policies apply to tenant 'bob' (other, svc)" in str(ei.value)
    assert decide(policies, "bob", req(), "other").policy == "other"
    assert decide(policies, "bob", req(policy="svc"), "other").policy == "svc"


def test_commands_env_seccomp_network(policies):
    assert denied(policies, req("/sbin/reboot")).field == "argv[0]"
    assert decide(policies, "alice", req("./main")).allowed
    e = denied(policies, req(env=(("LD_PRELOAD", "/x.so"),)))
    assert e.field == "env.LD_PRELOAD" and "env.allow: LANG, LC_*" in str(e)
    d = decide(policies, "alice", req(env=(("LC_ALL", "C"),)))
    assert ("LC_ALL", "C") in d.plan.env and ("PATH", "/usr/bin:/bin") in d.plan.env
    assert decide(policies, "alice", req(seccomp_profile="judge")).plan.seccomp.name == "judge"
    bob = denied(policies, req(seccomp_profile="default", policy="other"), tenant="bob")
    assert bob.field == "seccomp_profile" and "(allowed: judge)" in str(bob)
    e = denied(policies, req(network="host"))
    assert e.field == "network" and "(allowed: none)" in str(e)


def test_binds(policies, data_dir):
    ok = decide(policies, "alice", req(binds=(BindAsk(f"{data_dir}/allowed/f.txt", "/data/f.txt"),)))
    assert ok.plan.filesystem.binds[-1].source == f"{data_dir}/allowed/f.txt"
    assert ok.plan.filesystem.binds[-1].writable is False
    assert denied(policies, req(binds=(BindAsk(f"{data_dir}/secret", "/data/s"),))).field == "binds[0]"
    # A symlink inside the allowed tree that points out of it is resolved, then refused.
    e = denied(policies, req(binds=(BindAsk(f"{data_dir}/allowed/escape", "/data/e"),)))
    assert f"'{data_dir}/secret'" in str(e)
    assert "read-only" in str(denied(policies, req(binds=(BindAsk(f"{data_dir}/allowed", "/data", True),))))
    assert "target must be within /data" in str(
        denied(policies, req(binds=(BindAsk(f"{data_dir}/allowed", "/etc"),))))


def test_explain_returns_a_denial_instead_of_raising(policies):
    d = explain(policies, "alice", req(limits={"memory_bytes": 1 << 40}))
    assert not d.allowed and d.plan is None and d.policy == "svc"
    assert d.denied_field == "limits.memory_bytes"
    assert d.reason == "asked 1099511627776, policy 'svc' allows at most 268435456"


# -- structural validation ---------------------------------------------------------------------
@pytest.mark.parametrize("name,why", [
    ("../x", "'..'"), ("a/../../x", "'..'"), ("/etc/passwd", "not absolute"), ("a//b", "empty"),
    ("./a", "'.'"), ("a/", "empty"), ("", "must not be empty"), ("a\0b", "NUL"),
    ("a\nb", "control"), ("x" * 256, "longer than 255"), ("/".join(["d"] * 17), "deeper than 16"),
])
def test_file_names_cannot_leave_the_work_directory(name, why):
    with pytest.raises(RequestError) as ei:
        validate_request(req(files=(InputFile(name, b""),)), B)
    assert ei.value.field.startswith("files[0]")
    assert why in str(ei.value)


@pytest.mark.parametrize("r,field", [
    (RunRequest(argv=()), "argv"),
    (req("a\0b"), "argv[0]"),
    (req("/bin/true", limits={"memory_bytes": -1}), "limits.memory_bytes"),
    (req("/bin/true", limits={"cpu_quota": float("nan")}), "limits.cpu_quota"),
    (req("/bin/true", limits={"pids": 0}), "limits.pids"),
    (req("/bin/true", limits={"cpu_extra_ms": 5}), "limits.cpu_extra_ms"),
    (req("/bin/true", env=(("1X", "v"),)), "env[0].name"),
    (req("/bin/true", env=(("A", "1"), ("A", "2"))), "env[1].name"),
    (req("/bin/true", files=(InputFile("a", b""), InputFile("a", b""))), "files[1].name"),
    (req("/bin/true", files=(InputFile("a", b""), InputFile("a/b", b""))), "files[1].name"),
    (req("/bin/true", files=(InputFile("a", b"", 0o4755),)), "files[0].mode"),
    (req("/bin/true", cwd="box"), "cwd"),
    (req("/bin/true", cwd="/box/../etc"), "cwd"),
    (req("/bin/true", policy="Bad Name"), "policy"),
    (req("/bin/true", output_files=("../../etc/shadow",)), "output_files[0]"),
    (req("/bin/true", binds=(BindAsk("relative", "/x"),)), "binds[0].source"),
    (req("/bin/true", labels=(("bad key", "v"),)), "labels"),
    (req(*(["x"] * 2000)), "argv"),
    (req("/bin/true", files=(InputFile("big", b"x" * (B.max_file_bytes + 1)),)), "files[0].content"),
])
def test_malformed_requests_name_the_field(r, field):
    with pytest.raises(RequestError) as ei:
        validate_request(r, B)
    assert ei.value.field == field, str(ei.value)


# -- property-based: whatever arrives, the answer is a clean refusal or a plan within the policy
_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_name = st.one_of(_text, st.sampled_from(["..", "../x", "/abs", "a/./b", "ok.txt", "d/e.txt",
                                          "a\0b", "a\x7f", ".", "x" * 300]))
_num = st.one_of(st.integers(min_value=-(1 << 64), max_value=1 << 64),
                 st.floats(allow_nan=True, allow_infinity=True))
_limits = st.dictionaries(st.sampled_from(["cpu_time_ms", "wall_time_ms", "memory_bytes", "pids",
                                           "cpu_quota", "stdout_bytes", "open_files",
                                           "address_space_bytes"]), _num, max_size=4)
_request = st.builds(
    RunRequest,
    argv=st.lists(_text, max_size=5).map(tuple),
    env=st.lists(st.tuples(_text, _text), max_size=3).map(tuple),
    cwd=st.one_of(st.just(""), _text, st.sampled_from(["/box", "/box/../..", "//x"])),
    files=st.lists(st.builds(InputFile, name=_name, content=st.binary(max_size=8),
                             mode=st.integers(min_value=0, max_value=0o7777)), max_size=3).map(tuple),
    policy=st.one_of(st.just(""), st.sampled_from(["svc", "other", "nope"]), _text),
    seccomp_profile=st.one_of(st.just(""), st.sampled_from(["default", "judge", "../x"]), _text),
    limits=_limits,
    network=st.one_of(st.just(""), st.sampled_from(["none", "host", "segment:x"]), _text),
    output_files=st.lists(_name, max_size=3).map(tuple),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=_request)
def test_fuzzed_requests_are_refused_cleanly_or_stay_within_the_policy(policies, r):
    try:
        validate_request(r, B)
        d = decide(policies, "alice", r)
    except (RequestError, PermissionDenied) as e:
        assert str(e)  # a message a person can read
        return
    sp = policies.policies[d.policy].spec
    for k in ("cpu_time_ms", "memory_bytes", "cpu_quota"):
        mx = getattr(sp.limits, k).max
        v = getattr(d.plan.limits, k)
        assert mx is None or (v is not None and v <= mx)
    for f in r.files:
        assert not f.name.startswith("/") and ".." not in f.name.split("/")
    assert d.plan.network.mode == "none"
