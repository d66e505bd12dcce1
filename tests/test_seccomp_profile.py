"""Seccomp profiles without the kernel: parsing, validation, resolution and the compiled BPF.

Decisions are checked by running the exported BPF through seccomp.evaluate (a cBPF interpreter);
tests/test_seccomp_kernel.py checks the same programs against the real kernel. No root needed.
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from sandboxd.errors import PlanError, ProfileError
from sandboxd.plan import SeccompPlan
from sandboxd.runtime import seccomp as sc
from sandboxd.runtime import syscalls

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles" / "seccomp"
EVERYTHING = Path(__file__).resolve().parent / "seccomp_data" / "everything.json"
NR = syscalls.libseccomp_number


def prof(doc: dict, name: str = "t.json") -> sc.Profile:
    return sc.load_profile_text(json.dumps(doc, indent=1), name)


def base(default: str = "SCMP_ACT_ERRNO", **kw) -> dict:
    d = {"defaultAction": default, "syscalls": [
        {"names": ["read", "write", "execve", "exit_group"], "action": "SCMP_ACT_ALLOW"}]}
    d.update(kw)
    return d


def decide(c: sc.CompiledFilter, name: str, *args: int) -> tuple[str, int]:
    return sc.ret_action(sc.evaluate(c.bpf, NR(name), args))


def errors_of(excinfo: pytest.ExceptionInfo) -> list[str]:
    return [str(p) for p in excinfo.value.problems]


@pytest.fixture(autouse=True)
def _fresh_cache():
    sc.clear_cache()
    yield
    sc.clear_cache()


# --- the shipped profiles -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "judge"])
def test_shipped_profiles_load_compile_and_comment_every_rule(name):
    path = PROFILES / f"{name}.json"
    p = sc.load_profile(str(path))
    assert p.name == name and p.architectures == ("SCMP_ARCH_X86_64",)
    raw = json.loads(path.read_text())
    assert raw.get("comment")
    for i, rule in enumerate(raw["syscalls"]):
        assert len(rule.get("comment", "")) > 20, f"{name}.json syscalls[{i}] needs a comment saying why"
    for report in (False, True):
        c = sc.compile_profile(p, report_denials=report, sync_fd=3)
        assert c.profile_name == name
        assert len(c.bpf) // 8 <= sc.BPF_MAXINSNS


def test_default_profile_decisions():
    c = sc.compile_profile(sc.load_profile(str(PROFILES / "default.json")), report_denials=False)
    assert c.default_action == "SCMP_ACT_ERRNO(1)" and not c.uses_notify
    assert decide(c, "read") == ("allow", 0)
    # socket: an allowlist of families, so high bits cannot smuggle a denied family through
    assert decide(c, "socket", 1) == ("allow", 0)
    assert decide(c, "socket", 2) == ("allow", 0)
    assert decide(c, "socket", 10) == ("allow", 0)
    assert decide(c, "socket", 40) == ("errno", 1)            # AF_VSOCK
    assert decide(c, "socket", 38) == ("errno", 1)            # AF_ALG
    assert decide(c, "socket", 17) == ("errno", 1)            # AF_PACKET
    assert decide(c, "socket", (1 << 32) | 40) == ("errno", 1)
    assert decide(c, "socket", (1 << 32) | 1) == ("errno", 1)
    assert decide(c, "socket", 16, 3, 0) == ("allow", 0)      # NETLINK_ROUTE
    assert decide(c, "socket", 16, 3, 12) == ("errno", 1)     # NETLINK_NETFILTER
    assert decide(c, "clone", 0x01200011) == ("allow", 0)     # glibc fork
    assert decide(c, "clone", 0x10000000 | 17) == ("errno", 1)  # CLONE_NEWUSER
    assert decide(c, "clone3") == ("errno", errno.ENOSYS)
    assert decide(c, "personality", 0xFFFFFFFF) == ("allow", 0)
    assert decide(c, "personality", 0x0040000) == ("errno", 1)  # ADDR_NO_RANDOMIZE
    for name in ("unshare", "setns", "mount", "bpf", "io_uring_setup", "ptrace", "keyctl",
                 "userfaultfd", "perf_event_open", "process_vm_readv", "kexec_load", "init_module"):
        assert decide(c, name) == ("errno", 1), name
    assert c.unenforced == ["mseal", "getxattrat", "listxattrat", "setxattrat", "removexattrat"]


def test_judge_profile_decisions():
    c = sc.compile_profile(sc.load_profile(str(PROFILES / "judge.json")), report_denials=False)
    assert c.default_action == "SCMP_ACT_KILL_PROCESS"
    assert decide(c, "read") == ("allow", 0)
    assert decide(c, "socket", 1) == ("errno", errno.EACCES)   # shim for glibc's nscd probe
    assert decide(c, "clone3") == ("errno", errno.ENOSYS)
    assert decide(c, "clone", 0x01200011) == ("allow", 0)
    for name, args in [("clone", (0x20000000 | 17,)), ("socketpair", (1,)), ("connect", ()),
                       ("sendmsg", (3,)), ("ptrace", ()), ("unshare", ()), ("io_uring_setup", ()),
                       ("bpf", ()), ("perf_event_open", ()), ("userfaultfd", ()), ("keyctl", ()),
                       ("add_key", ()), ("request_key", ()), ("process_vm_readv", ()),
                       ("process_vm_writev", ()), ("kexec_load", ()), ("init_module", ()),
                       ("finit_module", ()), ("delete_module", ()), ("setns", ()), ("mount", ()),
                       ("personality", (0x0040000,)), ("splice", ()), ("setuid", ())]:
        assert decide(c, name, *args) == ("kill_process", 0), name


# --- parse + validate: errors, all at once, with key paths and lines ----------------------------

def test_everything_fixture_loads():
    p = sc.load_profile(str(EVERYTHING))
    assert p.default_action == "SCMP_ACT_ERRNO" and p.default_errno_ret == 1234
    assert p.arch_map[2] == sc.ArchMapEntry("SCMP_ARCH_RISCV64", ())
    assert p.flags == ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                       "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV")
    assert p.syscalls[1].names == ("getpid",)                  # legacy "name"
    assert {a.op for r in p.syscalls for a in r.args} == set(sc.OPS)
    assert {r.action for r in p.syscalls} == set(sc.ACTIONS) - {"SCMP_ACT_NOTIFY"}
    assert p.syscalls[16].includes == sc.Condition(caps=("CAP_SYS_PTRACE",))


def test_unknown_key_action_op_syscall_exact_text(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(
        '{\n'
        '  "defaultAction": "SCMP_ACT_ERRNO",\n'
        '  "syscalls": [\n'
        '    {"names": ["read", "opnat"], "action": "SCMP_ACT_ALLOWW"},\n'
        '    {"names": ["write"], "action": "SCMP_ACT_ALLOW", "colour": "red",\n'
        '     "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQUAL"}]}\n'
        '  ]\n'
        '}\n')
    with pytest.raises(ProfileError) as ei:
        sc.load_profile(str(f))
    assert errors_of(ei) == [
        f"{f}:4: syscalls[0].names[1]: unknown syscall 'opnat' (neither libseccomp "
        f"{syscalls.libseccomp_version()} nor the kernel's syscall tables know it); did you mean 'openat'?",
        f"{f}:4: syscalls[0].action: unknown action 'SCMP_ACT_ALLOWW'; did you mean 'SCMP_ACT_ALLOW'?",
        f"{f}:5: syscalls[1].colour: unknown key 'colour'",
        f"{f}:6: syscalls[1].args[0].op: unknown operator 'SCMP_CMP_EQUAL'; did you mean 'SCMP_CMP_EQ'?",
    ]
    e = ei.value
    assert e.step == "seccomp_profile" and e.path == str(f)
    assert str(e).startswith(f"seccomp_profile: invalid seccomp profile {f} (4 problems):\n  {f}:4: ")


def test_every_kind_of_problem_reported_at_once():
    doc = {
        "defaultAction": "SCMP_ACT_KILL", "defaultErrnoRet": 5, "architectures": ["SCMP_ARCH_AMD64"],
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["x86"]}],
        "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_FAST"],
        "listenerPath": "/run/agent.sock",
        "syscalls": [
            {"name": "read", "names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": [], "action": "SCMP_ACT_ALLOW"},
            {"names": ["write"]},
            {"names": ["write"], "action": "SCMP_ACT_NOTIFY"},
            {"names": ["write"], "action": "SCMP_ACT_ALLOW", "errnoRet": 3},
            {"names": ["write"], "action": "SCMP_ACT_ERRNO", "errnoRet": 5000},
            {"names": ["write"], "action": "SCMP_ACT_ALLOW", "args": [
                {"index": 6, "value": -1, "op": "SCMP_CMP_EQ"},
                {"index": 1, "value": True, "op": "SCMP_CMP_EQ"},
                {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"},
                {"value": 1.5, "op": "SCMP_CMP_EQ"}]},
            {"names": ["write"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_ADMN"], "arches": ["amd65"], "minKernel": "five"},
             "excludes": []},
            {"names": [42], "action": "SCMP_ACT_ALLOW", "comment": 7},
        ],
    }
    with pytest.raises(ProfileError) as ei:
        prof(doc)
    paths = [p.path for p in ei.value.problems]
    assert paths == [
        "defaultErrnoRet", "architectures[0]", "archMap[0].subArchitectures[0]", "flags[0]",
        "flags[1]", "listenerPath",
        "syscalls[0]", "syscalls[1].names", "syscalls[2]", "syscalls[3].action",
        "syscalls[4].errnoRet", "syscalls[5].errnoRet",
        "syscalls[6].args[0].index", "syscalls[6].args[0].value", "syscalls[6].args[1].value",
        "syscalls[6].args[2].index", "syscalls[6].args[3]", "syscalls[6].args[3].value",
        "syscalls[7].includes.caps[0]", "syscalls[7].includes.arches[0]",
        "syscalls[7].includes.minKernel", "syscalls[7].excludes",
        "syscalls[8].names[0]", "syscalls[8].comment",
    ]
    text = errors_of(ei)
    assert text[1].endswith("architectures[0]: unknown architecture 'SCMP_ARCH_AMD64'; did you mean 'SCMP_ARCH_ARM'?")
    assert text[6].endswith("syscalls[0]: use either 'names' or the legacy 'name', not both")
    assert text[8].endswith("syscalls[2]: missing required key 'action'")
    assert "SCMP_ACT_NOTIFY is not supported" in text[9]
    assert text[11].endswith("syscalls[5].errnoRet: 5000 is out of range 0..4095")
    assert text[15].endswith("argument 1 is already compared by args[1]; libseccomp allows one "
                             "comparison per argument in a rule (split the rule)")
    assert text[18].endswith("unknown capability 'CAP_SYS_ADMN'; did you mean 'CAP_SYS_ADMIN'?")


def test_not_json_and_duplicate_keys():
    with pytest.raises(ProfileError) as ei:
        sc.load_profile_text('{\n "defaultAction": "SCMP_ACT_ALLOW",\n}', "x.json")
    assert errors_of(ei) == ["x.json:3: not valid JSON: Expecting property name enclosed in double quotes (column 1)"]
    with pytest.raises(ProfileError) as ei:
        sc.load_profile_text('{"defaultAction": "SCMP_ACT_ALLOW",\n "defaultAction": "SCMP_ACT_LOG"}', "x.json")
    assert errors_of(ei) == ["x.json:2: defaultAction: duplicate key"]
    with pytest.raises(ProfileError) as ei:
        sc.load_profile_text('[]', "x.json")
    assert errors_of(ei) == ["x.json: expected an object, got an array"]


def test_missing_file_is_profile_error(tmp_path):
    with pytest.raises(ProfileError) as ei:
        sc.load_profile(str(tmp_path / "nope.json"))
    assert ei.value.errno == errno.ENOENT and ei.value.path == str(tmp_path / "nope.json")


# --- resolve + compile ----------------------------------------------------------------------------

def test_everything_fixture_compiles_and_decides():
    p = sc.load_profile(str(EVERYTHING))
    c = sc.compile_profile(p, report_denials=False)
    assert c.unenforced == ["mseal"]
    assert c.filtered_rules == (16, 19, 20, 22)   # includes caps, s390 arch, excludes x86_64, minKernel 99.1
    assert c.install_flags == sc.SECCOMP_FILTER_FLAG_LOG   # no listener: WAIT_KILLABLE_RECV not passed
    assert decide(c, "getpid") == ("allow", 0)
    assert decide(c, "getppid") == ("log", 0)
    assert decide(c, "getcwd") == ("errno", 2001)
    assert decide(c, "uname") == ("trace", 2002)
    assert decide(c, "acct") == ("trap", 0)
    assert decide(c, "reboot") == ("kill_thread", 0)
    assert decide(c, "swapon") == ("kill_thread", 0)
    assert decide(c, "kexec_load") == ("kill_process", 0)
    assert decide(c, "fcntl", 3, 1033) == ("errno", 1234)
    assert decide(c, "fcntl", 3, 1) == ("allow", 0)
    assert decide(c, "setpriority", 2, 0, 6) == ("allow", 0)
    assert decide(c, "setpriority", 3, 0, 6) == ("errno", 1234)
    assert decide(c, "setpriority", 2, 0, 5) == ("errno", 1234)
    assert decide(c, "personality", 8) == ("allow", 0)
    assert decide(c, "personality", 9) == ("errno", 1234)
    assert decide(c, "kill", 1, 9) == ("kill_process", 0)
    assert decide(c, "kill", 1, 15) == ("allow", 0)
    assert decide(c, "kill", 1, 2) == ("errno", 1234)
    assert decide(c, "ptrace") == ("errno", 2003)
    assert decide(c, "arch_prctl") == ("allow", 0)
    assert decide(c, "getpgrp") == ("errno", 1234)
    assert decide(c, "membarrier") == ("allow", 0)
    assert decide(c, "bpf") == ("errno", 1234)
    assert decide(c, "rseq") == ("allow", 0)
    assert decide(c, "gettid") == ("allow", 0)

    with_cap = sc.compile_profile(p, caps_keep=("CAP_SYS_PTRACE",), report_denials=False)
    assert decide(with_cap, "ptrace") == ("allow", 0)
    assert with_cap.filtered_rules == (17, 19, 20, 22)

    r = sc.compile_profile(p, report_denials=True)
    assert r.uses_notify
    assert r.install_flags == (sc.SECCOMP_FILTER_FLAG_NEW_LISTENER | sc.SECCOMP_FILTER_FLAG_LOG
                               | sc.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)
    # the default and the unconditional kill/trap rules are delegated ...
    assert r.actions_by_nr == {-1: ("errno", 1234), NR("acct"): ("kill", 0), NR("reboot"): ("kill", 0),
                               NR("swapon"): ("kill", 0), NR("kexec_load"): ("kill", 0)}
    for name in ("acct", "reboot", "kexec_load", "bpf"):
        assert decide(r, name) == ("notify", 0), name
    # ... explicit errno rules are not, and a conditional kill next to an errno default stays a
    # plain kernel kill (the supervisor could not tell it from the default by number)
    assert decide(r, "getcwd") == ("errno", 2001)
    assert decide(r, "kill", 1, 9) == ("kill_process", 0)
    assert decide(r, "kill", 1, 2) == ("notify", 0)
    assert r.action_for(NR("kill")) == ("errno", 1234)


def test_report_denials_maps_defaults():
    judge = sc.compile_profile(sc.load_profile(str(PROFILES / "judge.json")), report_denials=True)
    assert judge.uses_notify and judge.actions_by_nr == {-1: ("kill", 0)}
    assert decide(judge, "ptrace") == ("notify", 0)
    assert decide(judge, "clone3") == ("errno", errno.ENOSYS)   # shim: not reported
    assert judge.action_for(NR("ptrace")) == ("kill", 0)
    default = sc.compile_profile(sc.load_profile(str(PROFILES / "default.json")), report_denials=True)
    assert default.actions_by_nr == {-1: ("errno", errno.EPERM)}
    assert decide(default, "mount") == ("notify", 0)        # explicit rules equal to the default are no-ops
    allow_default = sc.compile_profile(prof({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 77}]}), report_denials=True)
    assert allow_default.actions_by_nr == {NR("ptrace"): ("kill", 0)}
    assert decide(allow_default, "ptrace") == ("notify", 0)
    assert decide(allow_default, "bpf") == ("errno", 77)
    assert decide(allow_default, "read") == ("allow", 0)
    plain = sc.compile_profile(prof({"defaultAction": "SCMP_ACT_ALLOW"}), report_denials=True)
    assert not plain.uses_notify and plain.install_flags == 0


def test_other_architectures_are_killed():
    c = sc.compile_profile(prof(base("SCMP_ACT_ALLOW")), report_denials=True)
    assert sc.evaluate(c.bpf, 20, arch=syscalls.AUDIT_ARCH_I386) == sc.RET_KILL_PROCESS
    assert sc.evaluate(c.bpf, syscalls.X32_SYSCALL_BIT | 39) == sc.RET_KILL_PROCESS
    assert sc.evaluate(c.bpf, 39) == sc.RET_ALLOW


def test_unresolvable_names_skip_only_when_safe():
    # an allow rule in a deny-by-default profile: skipping it only denies more
    c = sc.compile_profile(prof(base(syscalls=[
        {"names": ["execve", "mseal", "listns"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["socketcall", "recv", "arm_fadvise64_64"], "action": "SCMP_ACT_KILL_PROCESS"}])))
    assert c.unenforced == ["mseal", "listns"]
    assert decide(c, "execve") == ("allow", 0)
    # a deny rule (even an errno one) for a name this libseccomp cannot number: fail closed
    with pytest.raises(ProfileError) as ei:
        sc.compile_profile(prof({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mseal"], "action": "SCMP_ACT_KILL_PROCESS"}]}))
    assert errors_of(ei) == [
        f"t.json:6: syscalls[0].names[0]: syscall 'mseal' is newer than libseccomp "
        f"{syscalls.libseccomp_version()}, so this SCMP_ACT_KILL_PROCESS rule cannot be compiled, and "
        "skipping it would leave 'mseal' to the less restrictive default SCMP_ACT_ALLOW"]
    with pytest.raises(ProfileError):
        sc.compile_profile(prof(base(syscalls=[
            {"names": ["execve"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mseal"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}])))


def test_profile_denying_execve_cannot_compile():
    for doc in (
        {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["execve"], "action": "SCMP_ACT_KILL"}]},
    ):
        with pytest.raises(ProfileError) as ei:
            sc.compile_profile(prof(doc))
        assert errors_of(ei) == ["t.json: profile denies execve; nothing could start"]
        assert str(ei.value).startswith("seccomp_profile: cannot compile seccomp profile t.json (1 problem):")


def test_rules_libseccomp_would_drop_are_errors():
    # two unconditional rules with different actions: libseccomp keeps the first, silently
    with pytest.raises(ProfileError) as ei:
        sc.compile_profile(prof(base(syscalls=[
            {"names": ["execve", "ptrace"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"}])))
    assert errors_of(ei) == [
        "t.json:13: syscalls[1].names[0]: 'ptrace' also has an unconditional SCMP_ACT_ALLOW rule "
        "in syscalls[0]; libseccomp would silently drop this unconditional SCMP_ACT_KILL_PROCESS "
        "rule (merge or remove one)"]
    # an unconditional rule swallows conditional rules of another action
    with pytest.raises(ProfileError) as ei:
        sc.compile_profile(prof(base(syscalls=[
            {"names": ["execve"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97}])))
    assert "libseccomp would silently drop this conditional SCMP_ACT_ALLOW rule" in errors_of(ei)[0]
    # ... but a rule equal to the default next to anything is fine (it is a no-op)
    sc.compile_profile(prof(base(syscalls=[
        {"names": ["execve", "ptrace"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO"}])))


def test_sendmsg_exception():
    judge = sc.load_profile(str(PROFILES / "judge.json"))
    c = sc.compile_profile(judge, report_denials=False, sync_fd=7)
    assert c.sync_fd == 7
    assert decide(c, "sendmsg", 7) == ("allow", 0)
    assert decide(c, "sendmsg", 8) == ("kill_process", 0)
    assert decide(c, "sendmsg", (1 << 32) | 7) == ("kill_process", 0)
    assert decide(c, "sendto", 7) == ("kill_process", 0)
    without = sc.compile_profile(judge, report_denials=False)
    assert without.sync_fd is None and decide(without, "sendmsg", 7) == ("kill_process", 0)
    # a profile that already allows sendmsg needs no extra rule
    d = sc.compile_profile(sc.load_profile(str(PROFILES / "default.json")), sync_fd=7)
    assert d.sync_fd is None and decide(d, "sendmsg", 9) == ("allow", 0)
    with pytest.raises(ProfileError) as ei:
        sc.compile_profile(prof(base(syscalls=[
            {"names": ["execve"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["sendmsg"], "action": "SCMP_ACT_KILL_PROCESS"}])), sync_fd=7)
    assert "this unconditional rule denies sendmsg" in errors_of(ei)[0]


def test_includes_excludes_by_caps_and_kernel(monkeypatch):
    doc = base(syscalls=[
        {"names": ["execve"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"]}},
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1999, "excludes": {"caps": ["CAP_SYS_ADMIN", "CAP_KILL"]}},
        {"names": ["rseq"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "6.1"}},
    ])
    p = prof(doc)
    none = sc.compile_profile(p)
    assert decide(none, "mount") == ("notify", 0) and none.action_for(NR("mount")) == ("errno", 1)
    assert decide(none, "getppid") == ("errno", 1999)
    one = sc.compile_profile(p, caps_keep=("CAP_SYS_ADMIN",), report_denials=False)
    assert decide(one, "mount") == ("errno", 1)                 # includes needs every cap
    assert decide(one, "getppid") == ("errno", 1)               # excludes: any cap excludes
    both = sc.compile_profile(p, caps_keep=("CAP_SYS_CHROOT", "CAP_SYS_ADMIN"), report_denials=False)
    assert decide(both, "mount") == ("allow", 0)
    assert decide(both, "rseq") == ("allow", 0)
    monkeypatch.setattr(syscalls, "kernel_release", lambda: (5, 10, 0))
    sc.clear_cache()
    old = sc.compile_profile(p, report_denials=False)
    assert decide(old, "rseq") == ("errno", 1) and old.filtered_rules == (1, 3)
    with pytest.raises(PlanError):
        sc.compile_profile(p, caps_keep=("CAP_SYS_ADMN",))


def test_compile_cache():
    p = sc.load_profile(str(PROFILES / "judge.json"))
    a = sc.compile_profile(p, caps_keep=("CAP_KILL", "CAP_CHOWN"), sync_fd=3)
    assert sc.compile_profile(sc.load_profile(str(PROFILES / "judge.json")),
                              caps_keep=["CAP_CHOWN", "CAP_KILL"], sync_fd=3) is a
    assert sc.compile_profile(p, caps_keep=("CAP_KILL", "CAP_CHOWN"), sync_fd=4) is not a
    assert sc.compile_profile(p, caps_keep=("CAP_KILL", "CAP_CHOWN"), sync_fd=3, report_denials=False) is not a
    assert sc.compile_profile(p, sync_fd=3) is not a


def test_compile_for_plan_refuses_a_changed_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(base()))
    digest = sc.load_profile(str(f)).sha256
    plan = SeccompPlan(name="p", path=str(f), sha256=digest, report_denials=False)
    assert sc.compile_for_plan(plan).profile_name == "p"
    f.write_text(json.dumps(base("SCMP_ACT_ALLOW")))
    with pytest.raises(ProfileError, match="changed since the plan was made"):
        sc.compile_for_plan(plan)


def test_binary_tree_matches_linear_order(monkeypatch):
    """libseccomp's binary-tree layout (what we ship) decides exactly like its plain rule order."""
    rnd = random.Random(7)
    values = [0, 1, 2, 3, 7, 8, 9, 10, 15, 16, 38, 40, 1033, 0x10000000, 0x7E020000, 0x01200011,
              0xFFFFFFFF, (1 << 32) | 1, (1 << 64) - 1]
    for path in (PROFILES / "default.json", PROFILES / "judge.json", EVERYTHING):
        p = sc.load_profile(str(path))
        out = {}
        for opt in (1, 2):
            monkeypatch.setattr(sc, "_OPTIMIZE", opt)
            sc.clear_cache()
            out[opt] = sc.compile_profile(p, report_denials=True, sync_fd=3).bpf
        for nr in range(0, 480):
            for _ in range(12):
                args = [rnd.choice(values) for _ in range(6)]
                assert sc.evaluate(out[1], nr, args) == sc.evaluate(out[2], nr, args), (path.name, nr, args)


def test_syscall_names():
    assert sc.syscall_name(59) == "execve"
    assert sc.syscall_name(NR("getppid")) == "getppid"
    assert sc.syscall_name(462) == "mseal"               # newer than libseccomp: from our table
    assert sc.syscall_name(20, syscalls.AUDIT_ARCH_I386) == "getpid"
    assert sc.syscall_name(9999) == "syscall_9999"


def test_notification_struct_layouts_match_the_kernel_header():
    """Our ioctl numbers are derived from the struct sizes; the uapi header has the macros."""
    hdr = "/usr/include/linux/seccomp.h"
    if not os.path.exists(hdr):
        pytest.skip("host lacks: linux-libc-dev header /usr/include/linux/seccomp.h")
    text = Path(hdr).read_text()
    assert "SECCOMP_IOWR(0, struct seccomp_notif)" in text
    assert sc.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert sc.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
    assert sc.SECCOMP_IOCTL_NOTIF_ID_VALID == 0x40082102
