"""Policy and server-config loading: every problem at once, with file:line, key path and reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sandboxd.engine.config import ServerConfig, load_all, parse_config
from sandboxd.errors import PolicyError
from sandboxd.policy.loader import LoadContext, load_policy_texts
from sandboxd.policy.schema import PolicySpec
from sandboxd.policy.validate import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILES = os.path.join(ROOT, "profiles")
CTX = LoadContext(profile_dir=PROFILES, known_tenants=frozenset({"alice", "bob"}))

GOOD = """\
version: 1
name: ok
tenants: [alice]
seccomp: {default: default}
"""


def problems(text: str, name: str = "p.yaml", ctx: LoadContext = CTX) -> list[str]:
    with pytest.raises(PolicyError) as ei:
        load_policy_texts([(name, text)], ctx)
    return [str(p) for p in ei.value.errors]


def test_shipped_policies_load_with_the_example_config():
    loaded = load_all(os.path.join(ROOT, "config", "server.yaml"))
    assert set(loaded.policies.policies) == {"untrusted-service", "judge", "profile-lab"}
    judge = loaded.policies.policies["judge"]
    assert judge.seccomp["judge"].path.endswith("profiles/seccomp/judge.json")
    assert len(judge.seccomp["judge"].sha256) == 64
    # deny by default: a tenant that no policy names has no policies
    assert loaded.policies.for_tenant("nobody") == ()


def test_minimal_policy_loads_with_safe_defaults():
    ps = load_policy_texts([("p.yaml", GOOD)], CTX)
    sp = ps.policies["ok"].spec
    assert sp.capabilities == () and sp.network.allowed == ("none",)
    assert sp.limits.memory_bytes.max == 256 << 20
    assert ps.by_tenant == {"alice": ("ok",)}


def test_exact_text_of_schema_errors():
    text = textwrap.dedent("""\
        version: 1
        name: Bad Name
        tenants: [alice, no]
        seccomp: {default: default, alowed: [judge]}
        limits:
          memory_bytes: {default: 64Mi, max: 1Gx}
        colour: blue
        """)
    assert problems(text) == [
        "p.yaml:2:7: name: 'Bad Name' does not match a name: lower-case letters, digits, '.', "
        "'_', '-', up to 63, starting with a letter or digit",
        "p.yaml:3:18: tenants[1]: expected a string, got a boolean False (YAML reads "
        "yes/no/on/off as booleans: quote the value)",
        "p.yaml:4:29: seccomp.alowed: unknown key (allowed here: default, allowed, "
        "report_denials); did you mean 'allowed'?",
        "p.yaml:6:38: limits.memory_bytes.max: expected a size in bytes (an integer, or e.g. "
        "64Mi, 1Gi, 512K), got a string '1Gx'",
        "p.yaml:7:1: colour: unknown key (allowed here: version, name, tenants, seccomp, "
        "description, commands, capabilities, apparmor, landlock, user, filesystem, env, network, "
        "binds_allowed, limits, concurrency, output_limit_action)",
    ]


def test_exact_text_of_reference_errors_all_at_once():
    text = textwrap.dedent("""\
        version: 1
        name: refs
        tenants: [alice, mallory]
        seccomp: {default: no-such-profile, allowed: [judge]}
        capabilities: [CAP_NET_BIND_SERVICE, CAP_SYS_ADMN]
        network: {default: none, allowed: [none, host, "segment:web"]}
        filesystem:
          binds:
            - {source: /proc, target: /hostproc}
            - {source: /nonexistent-dir-xyz, target: /x}
            - {source: /usr/share, target: /dev/foo}
        limits:
          memory_bytes: {default: 2Gi, max: 1Gi}
          wall_time_ms: {default: null, max: 1000}
        user: {uid_mode: single}
        """)
    got = problems(text)
    assert got == [
        "p.yaml:3:18: tenants[1]: unknown tenant 'mallory' (server config tenants: alice, bob)",
        f"p.yaml:4:20: seccomp.default: unknown seccomp profile 'no-such-profile' (no file "
        f"{PROFILES}/seccomp/no-such-profile.json; known: default, judge)",
        "p.yaml:5:38: capabilities[1]: unknown capability 'CAP_SYS_ADMN'; did you mean "
        "'CAP_SYS_ADMIN'?",
        "p.yaml:6:42: network.allowed[1]: network mode 'host' gives up network isolation: the "
        "policy must say network.allow_host: true to allow it",
        "p.yaml:6:48: network.allowed[2]: unknown network segment 'web' (none are configured)",
        "p.yaml:9:16: filesystem.binds[0].source: '/proc' is never bindable: it exposes /proc "
        "(host kernel interfaces, devices, or the daemon's own state)",
        "p.yaml:10:16: filesystem.binds[1].source: '/nonexistent-dir-xyz' does not exist on this "
        "host (set optional: true if it may be absent)",
        "p.yaml:11:36: filesystem.binds[2].target: '/dev/foo' is inside /dev, which the runtime "
        "builds itself",
        "p.yaml:13:27: limits.memory_bytes.default: 2147483648 is above max 1073741824",
        "p.yaml:14:27: limits.wall_time_ms.default: may not be null: this limit cannot be "
        "switched off",
        "p.yaml:15:18: user.uid_mode: uid_mode single maps every run to one host uid, so "
        "concurrent runs could signal each other; set user.allow_single_uid: true to accept that",
    ]


def test_schema_and_reference_errors_come_together():
    # A bad size elsewhere does not hide the unknown capability: one pass reports both.
    text = GOOD + "capabilities: [CAP_FOO]\nfilesystem: {work_size_bytes: lots}\n"
    got = problems(text)
    assert len(got) == 2
    assert "capabilities[0]: unknown capability 'CAP_FOO'" in got[0]
    assert "filesystem.work_size_bytes: expected a size" in got[1]


def test_yaml_level_problems():
    assert "p.yaml:3:1: name: duplicate key (first defined on line 2)" in \
        problems("version: 1\nname: a\nname: b\n")
    assert problems("a: [\n")[0].startswith("p.yaml:2:1: YAML syntax:")
    assert problems("") == ["p.yaml:1:1: the file is empty"]
    assert problems("- just\n- a list\n")[0].startswith("p.yaml:1:1: expected a mapping")
    assert "merge keys" in problems(GOOD + "<<: {x: 1}\n")[0]
    assert "python/object" in problems(GOOD + "description: !!python/object:os.system x\n")[0]


def test_alias_bomb_is_refused_not_expanded():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    assert "alias expansion" in problems("\n".join(lines))[0]


def test_duplicate_policy_names_across_files():
    with pytest.raises(PolicyError) as ei:
        load_policy_texts([("a.yaml", GOOD), ("b.yaml", GOOD)], CTX)
    assert [str(p) for p in ei.value.errors] == [
        "b.yaml:2:7: name: policy name 'ok' is already used by a.yaml:2"]


def test_broken_profile_is_reported_through_the_runtime_validator(tmp_path):
    prof = tmp_path / "seccomp"
    prof.mkdir()
    (prof / "broken.json").write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": '
                                      '[{"names": ["no_such_syscall_xyz"], "action": "SCMP_ACT_ALLOW"}]}')
    ctx = LoadContext(profile_dir=str(tmp_path), known_tenants=frozenset({"alice"}))
    got = problems(GOOD.replace("default: default", "default: broken"), ctx=ctx)
    assert len(got) == 1 and got[0].startswith("p.yaml:4:20: seccomp.default: invalid seccomp profile")
    assert "no_such_syscall_xyz" in got[0]


def test_forbidden_sources_from_the_server():
    ctx = LoadContext(profile_dir=PROFILES, forbidden_sources=("/run/sandboxd",))
    text = GOOD + "filesystem:\n  binds: [{source: /run, target: /r, optional: true}]\n"
    got = problems(text, ctx=ctx)
    assert "'/run' is never bindable: it exposes /run/sandboxd" in got[0]


def test_limit_nullability():
    text = GOOD + "limits:\n  stdout_bytes: {default: null, max: null}\n  memory_bytes: {default: null, max: null}\n"
    got = problems(text)
    assert got == ["p.yaml:6:27: limits.stdout_bytes.default: may not be null: this limit cannot "
                   "be switched off",
                   "p.yaml:6:38: limits.stdout_bytes.max: may not be null: this limit cannot be "
                   "switched off"]


# -- server config ----------------------------------------------------------------------------
def test_config_problems_all_at_once(tmp_path):
    text = textwrap.dedent("""\
        version: 1
        listen:
          tcp: {address: "0.0.0.0:7443", cert: a.pem, key: a.key}
        tenants:
          a: {unix_uids: [0], token_sha256: [abc]}
          b: {unix_uids: [0]}
          c: {}
        runtime: {no_such_option: 1}
        shutdown_grace_ms: -1
        """)
    with pytest.raises(PolicyError) as ei:
        parse_config(text, "server.yaml", str(tmp_path))
    got = [str(p) for p in ei.value.errors]
    import dataclasses

    from sandboxd.runtime.config import RuntimeConfig
    known = ", ".join(sorted(f.name for f in dataclasses.fields(RuntimeConfig)))
    assert got == [
        "server.yaml:3:8: listen.tcp.client_ca: mutual TLS needs client_ca (or set "
        "require_client_cert: false and use bearer tokens)",
        "server.yaml:5:38: tenants.a.token_sha256[0]: 'abc' does not match 64 lower-case hex digits",
        "server.yaml:6:19: tenants.b.unix_uids[0]: 0 already identifies tenant 'a': an identity "
        "must name exactly one tenant",
        "server.yaml:7:6: tenants.c: no identity (unix_uids, token_sha256 or tls_identities): "
        "nobody can be this tenant",
        f"server.yaml:8:11: runtime.no_such_option: unknown RuntimeConfig key (known: {known})",
        "server.yaml:9:20: shutdown_grace_ms: must be at least 0, got -1",
    ]


def test_config_relative_paths_and_default_policy_check(tmp_path):
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "ok.yaml").write_text(GOOD)
    (tmp_path / "server.yaml").write_text(textwrap.dedent(f"""\
        version: 1
        policy_dir: pol
        profile_dir: {PROFILES}
        state_dir: st
        tenants:
          alice: {{unix_uids: [0], default_policy: nope}}
        """))
    with pytest.raises(PolicyError) as ei:
        load_all(str(tmp_path / "server.yaml"))
    assert [str(p) for p in ei.value.errors] == [
        f"{tmp_path}/server.yaml: tenants.alice.default_policy: policy 'nope' does not exist or "
        "does not name tenant 'alice'"]
    cfg = parse_config((tmp_path / "server.yaml").read_text(), str(tmp_path / "server.yaml"))
    assert cfg.policy_dir == str(tmp_path / "pol") and cfg.state_dir == str(tmp_path / "st")


# -- the command line and the docs -----------------------------------------------------------
def test_policy_check_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "capabilities: [CAP_NOPE]\n")
    r = subprocess.run([sys.executable, "-m", "sandboxd.cli", "policy", "check", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert r.stdout == f"{bad}:5:16: capabilities[0]: unknown capability 'CAP_NOPE'; did you mean 'CAP_MKNOD'?\n"
    r = subprocess.run([sys.executable, "-m", "sandboxd.cli", "policy", "check", "--config",
                        "config/server.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok (judge, profile-lab, untrusted-service)" in r.stdout


@pytest.mark.parametrize("doc,schema", [("policy.md", PolicySpec), ("api.md", ServerConfig)])
def test_docs_reference_matches_the_schema(doc, schema):
    """The docs' reference tables are rendered from the schemas; keep them in step."""
    with open(os.path.join(ROOT, "docs", doc)) as f:
        text = f.read()
    for key, tp, default, meaning in reference(schema):
        row = f"| `{key}` | {tp} | {default} | {meaning} |"
        assert row in text, f"docs/{doc} is missing or has a stale row for {key}:\n{row}"


def test_segments_come_from_the_runtime_network_config():
    from sandboxd.engine.config import load_context
    cfg = parse_config(textwrap.dedent("""\
        version: 1
        runtime:
          network:
            segments:
              lab: {subnet: 10.251.9.0/24}
        """), "server.yaml")
    ctx = load_context(cfg)
    assert ctx.segments == frozenset({"lab"})
    text = GOOD + "network: {allowed: [none, 'segment:lab'], default: none}\n"
    load_policy_texts([("p.yaml", text)], LoadContext(profile_dir=PROFILES, known_tenants=frozenset({"alice"}),
                                                      segments=ctx.segments))
    bad = GOOD + "network: {allowed: [none, 'segment:web'], default: none}\n"
    assert any("unknown network segment 'web' (lab)" in p for p in problems(bad, ctx=LoadContext(
        profile_dir=PROFILES, known_tenants=frozenset({"alice"}), segments=ctx.segments)))


def test_host_network_needs_an_explicit_flag():
    bad = GOOD + "network: {allowed: [none, host], default: none}\n"
    assert any("network.allow_host: true" in p for p in problems(bad))
    ok = GOOD + "network: {allowed: [none, host], default: none, allow_host: true}\n"
    load_policy_texts([("p.yaml", ok)], CTX)
