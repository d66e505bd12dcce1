"""AppArmor enforced by a real kernel: sandboxd's profiles loaded, a process moved into one at
execve, the forbidden actions failing with the kernel's errno, and the label read back.

The probe runs as root, so everything it tries succeeds without AppArmor (the unconfined
control run shows it): a failure under the profile is AppArmor's and nobody else's.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from sandboxd.errors import HostCapabilityError, LaunchError
from sandboxd.runtime import apparmor as aa
from tests.conftest import ROOT

PY = "/usr/bin/python3"          # the probe's interpreter; the judge profile allows /usr
WORK = "/tmp/sandboxd-vm-aa"      # scratch for the probes (the judge allows /tmp)
OUTSIDE = "/srv/sandboxd-vm-secret"   # a file no sandboxd profile lets the workload read
SYS_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
EACCES, EPERM = errno.EACCES, errno.EPERM

# Each action opens, creates or asks for something and reports 0 or the errno; nothing is
# changed that the fixtures do not undo. Then the probe waits on stdin so the test can read its
# confinement from outside while it is alive.
PROBE = textwrap.dedent(r"""
    import ctypes, json, os, socket, sys
    a = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    def c(rc):
        if rc != 0:
            raise OSError(ctypes.get_errno(), "")
    def opened(path, flags):
        os.close(os.open(path, flags, 0o600))
    actions = {
        "read_usr": lambda: opened("/usr/lib/os-release", os.O_RDONLY),
        "write_tmp": lambda: opened(a["tmp_file"], os.O_WRONLY | os.O_CREAT),
        "read_outside": lambda: opened(a["outside"], os.O_RDONLY),
        "write_proc_sys": lambda: opened("/proc/sys/kernel/domainname", os.O_WRONLY),
        "write_sys": lambda: opened(a["sys_file"], os.O_WRONLY),
        "mount": lambda: c(libc.mount(b"none", a["mnt"].encode(), b"tmpfs", 0, None)),
        "umount": lambda: c(libc.umount2(a["mounted"].encode(), 0)),
        "raw_socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close(),
        "packet_socket": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close(),
        "ptrace_peer": lambda: opened("/proc/%d/mem" % a["peer"], os.O_RDONLY),
        "chown": lambda: os.chown(a["tmp_file"], 1, 1),
    }
    out = {}
    for k in a["only"] or list(actions):
        try:
            actions[k]()
            out[k] = 0
        except OSError as e:
            out[k] = e.errno
    out["self"] = open("/proc/self/attr/current").read().strip()
    print(json.dumps(out), flush=True)
    sys.stdin.read()
""")

# What the judge profile must answer, as root (0: allowed). EPERM where the kernel asks for a
# capability before it calls AppArmor's hook for the operation: umount checks CAP_SYS_ADMIN
# first (mount calls the hook first), chown checks CAP_CHOWN; the judge's `deny capability`
# refuses both, so they are AppArmor's denials too (the unconfined control succeeds).
JUDGE_ENFORCE = {
    "read_usr": 0, "write_tmp": 0, "read_outside": EACCES, "write_proc_sys": EACCES,
    "write_sys": EACCES, "mount": EACCES, "umount": EPERM, "raw_socket": EACCES,
    "packet_socket": EACCES, "ptrace_peer": EACCES, "chown": EPERM,
}
# Complain mode: everything the profile merely does not allow goes through (and is logged);
# its deny rules, the hard floor, still hold.
JUDGE_COMPLAIN = dict(JUDGE_ENFORCE, read_outside=0)


@pytest.fixture(scope="module")
def support() -> dict:
    s = aa.host_support()
    assert s["enabled"], s["reason"]
    assert s["can_load"] and s["self_label"] == "unconfined", s
    return s


@pytest.fixture(scope="module")
def loaded(support) -> dict:
    """Load the profiles the tests use, the way the launcher does (as root)."""
    labels = {}
    for name, mode in (("sandboxd-judge", "enforce"), ("sandboxd-judge", "complain"),
                       ("sandboxd-default", "enforce"), ("sandboxd-launcher", "enforce")):
        labels[(name, mode)] = aa.ensure_loaded(name, aa.find_profile(name), mode=mode, support=support)
    return labels


@pytest.fixture(scope="module")
def scene():
    """Objects the probe acts on: a secret outside the sandbox paths, a mounted tmpfs to try to
    umount, an empty mountpoint, an unconfined peer process to trace."""
    os.makedirs(WORK, exist_ok=True)
    os.chmod(WORK, 0o777)
    with open(OUTSIDE, "w") as f:
        f.write("secret\n")
    mnt, mounted = f"{WORK}/mnt", f"{WORK}/mounted"
    os.makedirs(mnt, exist_ok=True)
    os.makedirs(mounted, exist_ok=True)
    peer = subprocess.Popen(["sleep", "600"])
    assert os.path.exists(SYS_FILE), SYS_FILE
    state = {"outside": OUTSIDE, "mnt": mnt, "mounted": mounted, "peer": peer.pid,
             "sys_file": SYS_FILE}
    yield state
    peer.kill()
    peer.wait()
    for m in (mnt, mounted):
        subprocess.run(["umount", m], capture_output=True)
    os.unlink(OUTSIDE)
    shutil.rmtree(WORK, ignore_errors=True)


def _reset_mounts(scene: dict) -> None:
    # A run allowed to mount or umount (the unconfined control) changes these; put them back.
    if os.path.ismount(scene["mnt"]):
        subprocess.run(["umount", scene["mnt"]], check=True)
    if not os.path.ismount(scene["mounted"]):
        subprocess.run(["mount", "-t", "tmpfs", "none", scene["mounted"]], check=True)


def run_probe(scene: dict, before_exec=None, only: tuple[str, ...] = (),
              tag: str = "x") -> tuple[dict, str, int]:
    """Fork, run `before_exec` in the child (the AppArmor step), exec the probe. Returns its
    results, its confinement as read from outside (/proc/<pid>), and its pid."""
    _reset_mounts(scene)
    args = dict(scene, tmp_file=f"{WORK}/probe-{tag}", only=list(only))
    p = subprocess.Popen([PY, "-I", "-S", "-c", PROBE, json.dumps(args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=before_exec,
                         close_fds=True)
    try:
        line = p.stdout.readline()
        assert line, f"probe died: {p.stderr.read().decode(errors='replace')}"
        conf = aa.read_confinement(p.pid)
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    _reset_mounts(scene)
    return json.loads(line), conf, p.pid


def kmsg_lines() -> list[str]:
    """The kernel log so far (audit records reach it when no auditd runs)."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    out = []
    try:
        while True:
            try:
                out.append(os.read(fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                break
            except OSError as e:       # EPIPE: records overwritten while reading; go on
                if e.errno != errno.EPIPE:
                    raise
    finally:
        os.close(fd)
    return out


def test_the_profiles_load_and_the_kernel_lists_them(loaded, support):
    have = aa.loaded_profiles(support["securityfs"])
    assert have["sandboxd-judge"] == "enforce"
    assert have["sandboxd-judge.complain"] == "complain"
    assert have["sandboxd-default"] == "enforce" and have["sandboxd-launcher"] == "enforce"


@pytest.mark.parametrize("name", ["sandboxd-judge", "sandboxd-default", "sandboxd-launcher"])
def test_profiles_validate_against_this_kernels_features(name, support):
    aa.validate_profile(aa.find_profile(name), support=support)


def test_unconfined_control_can_do_everything(scene):
    # Without AppArmor every action succeeds for root: the denials below are AppArmor's.
    res, conf, _ = run_probe(scene, tag="control")
    assert conf == "unconfined" and res.pop("self") == "unconfined"
    assert res == {k: 0 for k in JUDGE_ENFORCE}


@pytest.mark.parametrize("method", ["procfs", "libapparmor"])
def test_judge_enforce_denies_with_the_kernels_errno(loaded, support, scene, method):
    t = aa.resolve_transition(loaded[("sandboxd-judge", "enforce")], "enforce", support, "sandboxd-judge")
    used = []
    res, conf, pid = run_probe(scene, lambda: used.append(aa.apply_exec(t, method=method)), tag=method)
    assert conf == "sandboxd-judge (enforce)" and res.pop("self") == conf
    assert res == JUDGE_ENFORCE
    assert aa.verify(t, conf) == {"profile": "sandboxd-judge", "mode": "enforce",
                                  "label": "sandboxd-judge", "transition": "exec",
                                  "confinement": "sandboxd-judge (enforce)", "enforced": True}
    # What the profile merely does not allow is logged as DENIED; the deny rules are quiet.
    log = "".join(kmsg_lines())
    assert f'apparmor="DENIED" operation="open" profile="sandboxd-judge" name="{OUTSIDE}" pid={pid}' in log


def test_judge_complain_lets_it_through_and_logs(loaded, support, scene):
    t = aa.resolve_transition(loaded[("sandboxd-judge", "complain")], "complain", support, "sandboxd-judge")
    res, conf, pid = run_probe(scene, lambda: aa.apply_exec(t), tag="complain")
    assert conf == "sandboxd-judge.complain (complain)" and res.pop("self") == conf
    assert res == JUDGE_COMPLAIN
    aa.verify(t, conf)
    log = "".join(kmsg_lines())
    assert (f'apparmor="ALLOWED" operation="open" profile="sandboxd-judge.complain" '
            f'name="{OUTSIDE}" pid={pid}') in log


def test_the_enforce_profile_is_untouched_by_a_complain_run(loaded, support):
    # Complain mode is a separate loaded profile, not a mode switch of the shared one.
    have = aa.loaded_profiles(support["securityfs"])
    assert have["sandboxd-judge"] == "enforce"


def test_a_profile_that_is_not_loaded_fails_the_step_not_the_exec(loaded, support):
    t = aa.ExecTransition(profile="sandboxd-nope", mode="enforce", label="sandboxd-nope",
                          command="exec", attr_path=support["exec_attr"], self_label="unconfined")

    def child() -> None:
        try:
            aa.apply_exec(t, method="procfs")
        except LaunchError as e:
            os.write(1, json.dumps([e.step, e.errno]).encode())
        os._exit(0)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        child()
    os.close(w)
    out = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    assert json.loads(out) == ["apparmor_exec", errno.ENOENT]


def test_a_zombies_confinement_can_be_read(loaded, support):
    """A workload that exits at once still shows its label until it is reaped (waitid with
    WNOWAIT): the supervisor can always read back what ran."""
    t = aa.resolve_transition(loaded[("sandboxd-judge", "enforce")], "enforce", support, "sandboxd-judge")
    p = subprocess.Popen(["/usr/bin/true"], preexec_fn=lambda: aa.apply_exec(t))
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    assert aa.read_confinement(p.pid) == "sandboxd-judge (enforce)"
    p.wait()


def test_user_namespace_and_no_new_privs_still_transition(loaded, support, scene):
    """The sandbox's situation: the workload is in a new user namespace and has no_new_privs
    set when it execs. Without the profile, CAP_NET_RAW's absence would give EPERM; AppArmor's
    socket hook runs first and gives EACCES."""
    t = aa.resolve_transition(loaded[("sandboxd-judge", "enforce")], "enforce", support, "sandboxd-judge")
    libc = ctypes.CDLL(None, use_errno=True)

    def step() -> None:
        if libc.unshare(0x10000000) != 0:          # CLONE_NEWUSER
            raise OSError(ctypes.get_errno(), "unshare")
        if libc.prctl(38, 1, 0, 0, 0) != 0:        # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "prctl")
        aa.apply_exec(t)

    res, conf, _ = run_probe(scene, step, only=("read_outside", "raw_socket", "read_usr"), tag="userns")
    assert conf == "sandboxd-judge (enforce)"
    assert {k: res[k] for k in ("read_outside", "raw_socket", "read_usr")} == \
        {"read_outside": EACCES, "raw_socket": EACCES, "read_usr": 0}

    def control() -> None:
        libc.unshare(0x10000000)

    res, conf, _ = run_probe(scene, control, only=("raw_socket",), tag="userns-control")
    assert conf == "unconfined" and res["raw_socket"] == EPERM


CONFINED_SANDBOXD = textwrap.dedent(r"""
    # Runs under sandboxd-launcher, as sandboxd does when started with AppArmorProfile=.
    import ctypes, json, os, sys
    sys.path.insert(0, {root!r})
    from sandboxd.errors import LaunchError
    from sandboxd.runtime import apparmor as aa
    s = aa.host_support()
    libc = ctypes.CDLL(None, use_errno=True)
    out = {{"self": s["self_label"]}}
    for command in ("stack", "exec"):
        t = aa.resolve_transition("sandboxd-judge", "enforce", s, "sandboxd-judge")
        if command != t.command:
            t = aa.ExecTransition(**dict(t.__dict__, command=command))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            libc.prctl(38, 1, 0, 0, 0)            # no_new_privs, as before every workload
            try:
                aa.apply_exec(t, method="procfs")
            except LaunchError as e:
                os.write(w, json.dumps({{"error": e.errno}}).encode())
                os._exit(1)
            os.close(w)
            os.execv("/usr/bin/sleep", ["sleep", "30"])
        os.close(w)
        err = os.read(r, 4096)
        if err:
            out[command] = json.loads(err)
        else:
            import time
            for _ in range(100):                   # until the exec has happened
                conf = aa.read_confinement(pid)
                if "sandboxd-judge" in conf:
                    break
                time.sleep(0.05)
            out[command] = {{"confinement": conf, "verified": aa.verify(t, conf)["enforced"]}}
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(json.dumps(out))
""")


def test_confined_sandboxd_stacks_because_no_new_privs_forbids_exec(loaded, support):
    """Under the sandboxd-launcher profile, no_new_privs lets the workload only narrow its
    confinement: a stack works and is what prepare() picks; a plain exec transition is refused."""
    t = aa.resolve_transition(loaded[("sandboxd-launcher", "enforce")], "enforce", support,
                              "sandboxd-launcher")
    code = CONFINED_SANDBOXD.format(root=ROOT)
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       preexec_fn=lambda: aa.apply_exec(t), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["self"] == "sandboxd-launcher (enforce)"
    assert out["stack"]["verified"] is True
    assert out["stack"]["confinement"] in ("sandboxd-judge//&sandboxd-launcher (enforce)",
                                           "sandboxd-launcher//&sandboxd-judge (enforce)")
    assert out["exec"] == {"error": errno.EPERM}


def test_unprivileged_sandboxd_finds_loaded_profiles_and_names_missing_ones(loaded):
    """A rootless sandboxd cannot read <securityfs>/profiles or load policy: it checks the
    per-profile policy tree and, for a missing profile, says which and how to load it."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {ROOT!r})
        from sandboxd.errors import HostCapabilityError
        from sandboxd.runtime import apparmor as aa
        s = aa.host_support()
        out = {{"can_load": s["can_load"]}}
        out["judge"] = aa.ensure_loaded("sandboxd-judge", aa.find_profile("sandboxd-judge"), support=s)
        try:
            aa.ensure_loaded("sandboxd-default", aa.find_profile("sandboxd-default"), mode="complain", support=s)
        except HostCapabilityError as e:
            out["missing"] = str(e)
        print(json.dumps(out))
    """)

    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       preexec_fn=drop, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["can_load"] is False and out["judge"] == "sandboxd-judge"
    assert "AppArmor profile 'sandboxd-default.complain' is not loaded, and this process (uid 65534)" in out["missing"]
    assert "sandboxd.runtime.apparmor load --complain sandboxd-default" in out["missing"]


def test_required_profile_missing_from_disk_is_a_profile_error(support):
    from sandboxd.errors import ProfileError
    from sandboxd.plan import AppArmorPlan
    with pytest.raises(ProfileError, match="unknown AppArmor profile 'sandboxd-nope'"):
        aa.prepare(AppArmorPlan(profile="sandboxd-nope", required=True), support=support)
    with pytest.raises(HostCapabilityError):
        aa.ensure_loaded("sandboxd-judge", aa.find_profile("sandboxd-judge"),
                         support=dict(support, enabled=False, reason="test: disabled"))
