"""resolve(): the plan -> Landlock rules decision, without a kernel (pure function)."""

from __future__ import annotations

import pytest

from sandboxd.errors import HostCapabilityError, PlanError
from sandboxd.plan import Bind, FilesystemPlan, LandlockPlan, NetworkPlan, Plan, Tmpfs
from sandboxd.runtime import landlock as ll
from sandboxd.runtime.landlock import (ACCESS_FS_EXECUTE, ACCESS_FS_IOCTL_DEV, ACCESS_FS_MAKE_BLOCK,
                                       ACCESS_FS_MAKE_CHAR, ACCESS_FS_READ_DIR, ACCESS_FS_READ_FILE,
                                       ACCESS_FS_REFER, ACCESS_FS_TRUNCATE, ACCESS_FS_WRITE_FILE,
                                       ACCESS_NET_BIND_TCP, ACCESS_NET_CONNECT_TCP, READ, READ_EXEC,
                                       READ_WRITE, READ_WRITE_EXEC)

FS = FilesystemPlan(
    binds=(Bind("/usr", "/usr"), Bind("/lib64", "/lib64", optional=True),
           Bind("/etc/ssl", "/etc/ssl"), Bind("/srv/data", "/data"),
           Bind("/srv/out", "/out", writable=True)),
    tmpfs=(Tmpfs("/tmp", 1 << 20), Tmpfs("/dev/shm", 1 << 20)),
    files=(("/etc/passwd", "x"),),
)


def plan(**landlock) -> Plan:
    return Plan(argv=("/usr/bin/true",), filesystem=FS, landlock=LandlockPlan(**landlock))


def by_path(rules: ll.LandlockRules) -> dict[str, ll.PathRule]:
    return {r.path: r for r in rules.paths}


def test_abi7_handles_every_known_right():
    r = ll.resolve(plan(), 7)
    assert r.enforce and r.abi == 7 and r.host_abi == 7
    assert r.handled_fs == (1 << 16) - 1           # all 16 filesystem rights, REFER/TRUNCATE/IOCTL_DEV too
    assert r.handled_net == ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
    assert ll.scope_names(r.scoped) == ["abstract_unix_socket", "signal"]
    assert r.ports == ()                            # no port named: every TCP bind/connect denied
    assert r.unenforced == ()


def test_path_rules_follow_the_filesystem_plan():
    p = by_path(ll.resolve(plan(), 7))
    assert p["/usr"].access == READ_EXEC and not p["/usr"].optional
    assert p["/lib64"].access == READ_EXEC and p["/lib64"].optional
    assert p["/etc/ssl"].access == READ                       # /etc: read, never execute
    assert p["/data"].access == READ                          # read-only data bind
    assert p["/out"].access == READ_WRITE                     # writable bind: no execute
    assert p["/tmp"].access == READ_WRITE and p["/dev/shm"].access == READ_WRITE
    assert p["/box"].access == READ_WRITE_EXEC                # the work dir runs what it compiles
    assert p["/etc/passwd"].access == READ                    # generated file
    assert p["/proc"].access == READ
    assert p["/dev/null"].access == ACCESS_FS_READ_FILE | ACCESS_FS_WRITE_FILE
    assert p["/dev/urandom"].access == ACCESS_FS_READ_FILE
    assert p["/dev/tty"].access & ACCESS_FS_IOCTL_DEV and p["/dev/tty"].optional
    assert not p["/dev/null"].access & ACCESS_FS_IOCTL_DEV
    # Nothing for the root itself or for the host-side source paths.
    assert "/" not in p and "/srv/data" not in p and "/srv/out" not in p
    for rule in p.values():
        assert not rule.access & (ACCESS_FS_MAKE_CHAR | ACCESS_FS_MAKE_BLOCK)
    assert not ll.READ_WRITE & ACCESS_FS_EXECUTE


def test_extra_paths_and_merging():
    r = ll.resolve(Plan(argv=("x",), filesystem=FilesystemPlan(
        binds=(Bind("/a", "/shared", optional=True),)),
        landlock=LandlockPlan(extra_read=("/opt/tool",), extra_write=("/shared", "/var/cache"))), 7)
    p = by_path(r)
    assert p["/opt/tool"].access == READ
    assert p["/var/cache"].access == READ_WRITE
    # /shared is an optional read-only bind and an extra_write: rights add up, and one required
    # source makes it required.
    assert p["/shared"].access == READ_WRITE and not p["/shared"].optional
    assert p["/shared"].origin == "bind /shared, landlock.extra_write"


def test_proc_and_dev_follow_the_plan():
    fs = FilesystemPlan(proc=False, dev_nodes=("null",))
    p = by_path(ll.resolve(Plan(argv=("x",), filesystem=fs), 7))
    assert "/proc" not in p and "/dev/null" in p and "/dev/zero" not in p


def test_argv0_outside_exec_paths_gets_a_file_rule():
    fs = FilesystemPlan(binds=(Bind("/srv/judge", "/judge"),))
    p = by_path(ll.resolve(Plan(argv=("/judge/checker",), filesystem=fs), 7))
    assert p["/judge"].access == READ                                  # the directory stays read-only
    assert p["/judge/checker"].access == ACCESS_FS_EXECUTE | ACCESS_FS_READ_FILE
    assert p["/judge/checker"].optional          # a missing program is execve's error to report
    p = by_path(ll.resolve(Plan(argv=("/box/a.out",), filesystem=fs), 7))
    assert "/box/a.out" not in p                                       # covered by the work dir
    merged = FilesystemPlan(binds=(Bind("/usr", "/usr"),), symlinks=(("/bin", "usr/bin"),))
    p = by_path(ll.resolve(Plan(argv=("/bin/sh",), filesystem=merged), 7))
    assert "/bin/sh" not in p                                          # /bin -> usr/bin: under /usr
    p = by_path(ll.resolve(Plan(argv=("python3",), filesystem=fs), 7))
    assert not any(k.endswith("python3") for k in p)                   # PATH lookup: not ours to guess


@pytest.mark.parametrize("abi,fs_bits", [(1, 13), (2, 14), (3, 15), (4, 15), (5, 16), (6, 16), (7, 16), (99, 16)])
def test_handled_rights_per_abi(abi, fs_bits):
    r = ll.resolve(plan(mode="best_effort"), abi)
    assert r.handled_fs == (1 << fs_bits) - 1
    assert r.handled_net == (3 if abi >= 4 else 0)
    assert r.scoped == (3 if abi >= 6 else 0)
    assert r.abi == min(abi, ll.KNOWN_ABI) and r.host_abi == abi
    for rule in r.paths:                     # a rule may only carry handled rights (else EINVAL)
        assert rule.access & ~r.handled_fs == 0 and rule.access


def test_older_abi_drops_rights_from_rules():
    p = by_path(ll.resolve(plan(mode="best_effort"), 1))
    assert p["/tmp"].access == READ_WRITE & ~(ACCESS_FS_REFER | ACCESS_FS_TRUNCATE)


def test_required_refuses_missing_scope_with_exact_message():
    with pytest.raises(HostCapabilityError) as ei:
        ll.resolve(plan(), 5)
    assert str(ei.value) == (
        "landlock: host Landlock ABI 5 cannot enforce what the plan requires: scoping of abstract "
        "unix sockets and signals needs ABI 6 (Linux 6.12); hint: run on Linux >= 6.12, set "
        "landlock.mode: best_effort, or ask for less: landlock.scope: false")
    assert ei.value.step == "landlock"


def test_required_lists_everything_missing_at_once():
    with pytest.raises(HostCapabilityError) as ei:
        ll.resolve(plan(tcp_connect=(443,)), 3)
    msg = str(ei.value)
    assert "TCP bind/connect control needs ABI 4 (Linux 6.7)" in msg
    assert "scoping of abstract unix sockets and signals needs ABI 6" in msg
    assert "empty landlock.tcp_bind and landlock.tcp_connect" in msg


def test_required_without_landlock():
    with pytest.raises(HostCapabilityError, match="Landlock is not available on this host"):
        ll.resolve(plan(), 0)


def test_required_tcp_only_when_the_plan_restricts_tcp():
    # No ports and network mode none: the private netns has loopback only, so ABI 3 is enough;
    # what is not enforced is still reported.
    r = ll.resolve(plan(scope=False), 3)
    assert r.enforce and r.handled_net == 0
    assert any(u.startswith("tcp: ") and "not required" in u for u in r.unenforced)
    # A network mode that reaches further makes TCP control a requirement.
    p = Plan(argv=("x",), landlock=LandlockPlan(scope=False), network=NetworkPlan(mode="bridge"))
    with pytest.raises(HostCapabilityError, match="TCP bind/connect control needs ABI 4"):
        ll.resolve(p, 3)


def test_refinements_are_reported_not_refused():
    r = ll.resolve(plan(scope=False), 4)
    assert [u.split(":")[0] for u in r.unenforced] == ["ioctl_dev"]
    r = ll.resolve(plan(scope=False), 2)
    assert {u.split(":")[0] for u in r.unenforced} == {"tcp", "truncate", "ioctl_dev"}


def test_best_effort_drops_and_records():
    r = ll.resolve(plan(mode="best_effort", tcp_bind=(8080,), tcp_connect=(443,)), 3)
    assert r.enforce and r.scoped == 0 and r.ports == () and r.handled_net == 0
    keys = [u.split(":")[0] for u in r.unenforced]
    assert keys == ["tcp", "scope", "ioctl_dev"]
    assert "scope: scoping of abstract unix sockets and signals needs ABI 6, host has 3" in r.unenforced


def test_best_effort_without_landlock_enforces_nothing_and_says_so():
    r = ll.resolve(plan(mode="best_effort"), 0)
    assert not r.enforce and r.paths == ()
    assert r.unenforced == ("landlock: not available on this host (ABI 0); no Landlock restriction applied",)


def test_disabled():
    r = ll.resolve(plan(enabled=False), 7)
    assert not r.enforce and r.unenforced == ("landlock: disabled by the plan",)


def test_ports_merge_bind_and_connect():
    r = ll.resolve(plan(tcp_bind=(8080, 9000), tcp_connect=(9000,)), 7)
    assert [(p.port, p.access) for p in r.ports] == [
        (8080, ACCESS_NET_BIND_TCP), (9000, ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP)]


def test_bad_inputs_are_plan_errors_all_at_once():
    p = Plan(argv=("x",), filesystem=FilesystemPlan(dev_nodes=("null", "sda")),
             landlock=LandlockPlan(extra_read=("relative/path", "/a/../b"), tcp_connect=(70000, True)))
    with pytest.raises(PlanError) as ei:
        ll.resolve(p, 7)
    msg = str(ei.value)
    for piece in ("'sda' has no Landlock rights defined", "'relative/path' is not an absolute",
                  "'/a/../b' is not an absolute", "landlock.tcp_connect: 70000 is not a TCP port",
                  "landlock.tcp_connect: True is not a TCP port"):
        assert piece in msg


def test_unknown_mode_is_a_plan_error():
    with pytest.raises(PlanError, match="landlock.mode must be one of required, best_effort, got 'maybe'"):
        ll.resolve(plan(mode="maybe"), 7)


def test_to_dict_names_rights():
    d = ll.resolve(plan(), 7).to_dict()
    usr = next(x for x in d["paths"] if x["path"] == "/usr")
    assert usr["access"] == ["execute", "read_file", "read_dir"]
    assert d["scoped"] == ["abstract_unix_socket", "signal"]
    assert "ioctl_dev" in d["handled_access_fs"]


def test_prepare_disabled_is_a_noop_attestation():
    prep = ll.prepare(ll.resolve(plan(mode="best_effort"), 0))
    att = ll.apply(prep)              # restricts nothing, so safe in the test process
    assert att["enabled"] is False and att["path_rules"] == 0 and att["unenforced"]


def test_file_rights_mask():
    assert ll.FILE_RIGHTS & ACCESS_FS_READ_DIR == 0
    assert READ & ll.FILE_RIGHTS == ACCESS_FS_READ_FILE
