"""AppArmor layer on the host: profiles parse with the real apparmor_parser, the decisions and
the error messages. This host's kernel has no AppArmor; tests/vm proves enforcement on one
that has (tests/vm/test_apparmor_vm.py)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from sandboxd.errors import HostCapabilityError, LaunchError, PlanError, ProfileError
from sandboxd.plan import AppArmorPlan
from sandboxd.runtime import apparmor as aa

PROFILES = sorted(p.name for p in aa.PROFILE_DIR.iterdir() if p.is_file())
HOST_HAS_APPARMOR = os.path.exists(aa.ENABLED_PARAM)


@pytest.fixture(scope="module")
def support() -> dict:
    s = aa.host_support()
    if s["parser"] is None:
        pytest.fail("apparmor_parser is missing: scripts/setup.sh installs the apparmor package")
    return s


def fake_support(**kw) -> dict:
    base = {"enabled": True, "reason": None, "securityfs": "/nonexistent", "self_label": "unconfined",
            "exec_attr": "/proc/self/attr/apparmor/exec", "can_load": False, "parser": "/x",
            "parser_version": "3.0.8", "abi4": False, "userns_mediated": False, "libapparmor": False}
    base.update(kw)
    return base


# -- the shipped profiles ------------------------------------------------------------------------

def test_the_three_profiles_ship():
    assert {"sandboxd-default", "sandboxd-judge", "sandboxd-launcher"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_validates_with_apparmor_parser(name, support):
    aa.validate_profile(aa.find_profile(name), support=support)


@pytest.mark.parametrize("name", PROFILES)
def test_complain_variant_validates_too(name, support):
    path = aa.find_profile(name)
    text = aa.render_profile(Path(path).read_text(), path, complain=True, abi4=support["abi4"])
    assert re.search(rf"^profile {re.escape(name)}\.complain flags=\(.*\bcomplain\) \{{$", text, re.M)
    aa._run_parser(aa._validate_args(support), text, path, "apparmor_validate")


@pytest.mark.parametrize("name", PROFILES)
def test_every_rule_group_says_why(name):
    """Each block of rules (lines between blank lines) inside the profile opens with a comment."""
    text = Path(aa.find_profile(name)).read_text()
    body = text[text.index("{", text.index("\nprofile ")) + 1: text.rindex("}")]
    for block in re.split(r"\n[ \t]*\n", body):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        rules = [ln for ln in lines if not ln.startswith("#")]
        if rules:
            assert lines[0].startswith("#"), f"{name}: rule group without a comment: {rules[0]!r}"


def _rules(name: str) -> set[str]:
    text = Path(aa.find_profile(name)).read_text()
    return {ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")}


@pytest.mark.parametrize("rule", [
    "deny mount,", "deny umount,", "deny remount,", "deny pivot_root,", "deny ptrace (trace, read),",
    "deny network raw,", "deny network packet,", "deny capability,",
    "deny @{PROC}/sys/** wl,", "deny @{sys}/** wl,",
])
def test_judge_has_its_hard_floor(rule):
    assert rule in _rules("sandboxd-judge")


def test_judge_has_no_broad_allow_outside_the_sandbox_paths():
    # Reading the whole tree or writing outside /box, /tmp, /dev/shm would defeat the profile.
    rules = _rules("sandboxd-judge")
    assert "/** r," not in rules and "/** rmix," not in rules and "file," not in rules
    writable = [r for r in rules if not r.startswith(("deny", "owner @{PROC}", "signal", "ptrace",
                                                      "network", "capability", "profile", "abi",
                                                      "include", "}"))
                and re.search(r"\s[a-z]*w[a-z]*,$", r)]
    assert sorted(w.split()[0] for w in writable) == sorted(
        ["/box/{,**}", "/tmp/{,**}", "/dev/shm/{,**}", "/dev/{null,zero,full,random,urandom,tty}",
         "/dev/pts/[0-9]*"])


def test_launcher_allows_userns_on_apparmor_4_only(support):
    path = aa.find_profile("sandboxd-launcher")
    text = Path(path).read_text()
    assert "#sandboxd-abi4: userns," in text and "\n  userns," not in text
    v4 = aa.render_profile(text, path, abi4=True)
    assert "\n  userns,\n" in v4 and "abi <abi/4.0>," in v4 and "abi <abi/3.0>," not in v4
    assert v4.count("\n") == text.count("\n")                # error lines still match the file
    # Profiles without such lines keep their ABI: 4.0 would change what the kernel mediates.
    judge = Path(aa.find_profile("sandboxd-judge")).read_text()
    assert aa.render_profile(judge, "sandboxd-judge", abi4=True) == judge


def test_launcher_may_only_move_workloads_into_sandboxd_profiles():
    rules = _rules("sandboxd-launcher")
    cps = {r for r in rules if r.startswith("change_profile")}
    assert cps == {"change_profile -> sandboxd-*,", "change_profile -> &sandboxd-*,"}


# -- validation errors: file, line, cause --------------------------------------------------------

def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


HEAD = "abi <abi/3.0>,\ninclude <tunables/global>\n"


def test_syntax_error_names_file_and_line(tmp_path, support):
    p = _write(tmp_path, "sandboxd-bad", HEAD + "profile sandboxd-bad flags=(attach_disconnected) {\n"
               "  /usr/** r,\n  /box/** rwz,\n}\n")
    with pytest.raises(ProfileError) as ei:
        aa.validate_profile(p, support=support)
    e = ei.value
    assert e.step == "apparmor_validate" and e.path == p and e.line == 5
    assert str(e).startswith(f"apparmor_validate: {p}:5: syntax error")


def test_unknown_capability_is_an_error_not_a_warning(tmp_path, support):
    p = _write(tmp_path, "sandboxd-cap", HEAD + "profile sandboxd-cap {\n  capability bogus,\n}\n")
    with pytest.raises(ProfileError, match=rf"{re.escape(p)}:4: Invalid capability bogus"):
        aa.validate_profile(p, support=support)


def test_missing_include_is_reported(tmp_path, support):
    p = _write(tmp_path, "sandboxd-inc", "include <sandboxd/nonexistent>\nprofile sandboxd-inc {\n}\n")
    with pytest.raises(ProfileError, match=rf"{re.escape(p)}:1: Could not open 'sandboxd/nonexistent'"):
        aa.validate_profile(p, support=support)


def test_file_must_be_named_after_its_profile(tmp_path, support):
    p = _write(tmp_path, "sandboxd-x", HEAD + "profile sandboxd-y flags=(attach_disconnected) {\n}\n")
    with pytest.raises(ProfileError) as ei:
        aa.validate_profile(p, support=support)
    assert str(ei.value) == (f"apparmor_validate: {p}:3: the file defines profile 'sandboxd-y'; a "
                             "profile file is named after its profile, so this one must define "
                             f"'sandboxd-x' [{p}]")


def test_mode_flags_belong_to_the_policy(tmp_path, support):
    p = _write(tmp_path, "sandboxd-m", HEAD + "profile sandboxd-m flags=(complain) {\n}\n")
    with pytest.raises(ProfileError, match=r":3: flags \['complain'\] set a mode; the policy chooses"):
        aa.validate_profile(p, support=support)


def test_exactly_one_profile_per_file(tmp_path, support):
    p = _write(tmp_path, "sandboxd-two", HEAD + "profile sandboxd-two {\n}\nprofile other {\n}\n")
    with pytest.raises(ProfileError, match="defines exactly one profile .* found 2"):
        aa.validate_profile(p, support=support)


def test_unreadable_and_binary_files(tmp_path, support):
    with pytest.raises(ProfileError) as ei:
        aa.validate_profile(tmp_path / "nope", support=support)
    assert ei.value.errno == errno.ENOENT
    p = tmp_path / "sandboxd-bin"
    p.write_bytes(b"profile \xff {\n}\n")
    with pytest.raises(ProfileError, match="not UTF-8"):
        aa.validate_profile(p, support=support)


# -- names and lookup ----------------------------------------------------------------------------

def test_unknown_profile_names_the_directory(tmp_path):
    with pytest.raises(ProfileError) as ei:
        aa.find_profile("sandboxd-nope", dirs=(tmp_path,))
    assert ei.value.path == str(tmp_path / "sandboxd-nope")
    assert f"a profile is a file named after it in {tmp_path}" in str(ei.value)


@pytest.mark.parametrize("name", ["../etc/passwd", "Upper", "", "a" * 64, "x/y", ".hidden"])
def test_bad_names_are_plan_errors(name):
    with pytest.raises(PlanError, match="bad AppArmor profile name"):
        aa.find_profile(name)


def test_complain_suffix_is_reserved():
    with pytest.raises(PlanError, match="reserved for complain-mode variants; set mode: complain"):
        aa.check_plan(AppArmorPlan(profile="sandboxd-judge.complain"), fake_support())


# -- decisions -----------------------------------------------------------------------------------

def test_no_profile_is_not_requested():
    assert aa.check_plan(AppArmorPlan(), fake_support(enabled=False, reason="x")) == \
        {"requested": None, "applied": False, "reason": "not requested"}


def test_required_on_a_host_without_apparmor_refuses_and_says_so():
    s = fake_support(enabled=False, reason="the kernel has no AppArmor (/sys/module/apparmor/"
                     "parameters/enabled does not exist)")
    with pytest.raises(HostCapabilityError) as ei:
        aa.check_plan(AppArmorPlan(profile="sandboxd-judge", required=True), s)
    msg = str(ei.value)
    assert msg.startswith("apparmor: AppArmor profile 'sandboxd-judge' is required, but this host "
                          "cannot apply it: the kernel has no AppArmor")
    assert "apparmor.required: false" in msg


def test_not_required_on_a_host_without_apparmor_is_reported_not_applied():
    r = aa.check_plan(AppArmorPlan(profile="sandboxd-judge", mode="complain"),
                      fake_support(enabled=False, reason="AppArmor is disabled in this kernel"))
    assert r == {"requested": "sandboxd-judge", "mode": "complain", "required": False,
                 "applied": False, "reason": "not applied (host lacks AppArmor)",
                 "host": "AppArmor is disabled in this kernel"}


def test_unknown_mode_is_a_plan_error():
    with pytest.raises(PlanError, match=r"apparmor.mode must be one of \['enforce', 'complain'\]"):
        aa.check_plan(AppArmorPlan(profile="sandboxd-judge", mode="audit"), fake_support())


def test_this_host_is_reported_as_it_is(support):
    if HOST_HAS_APPARMOR:
        pytest.skip("host lacks: an AppArmor-free kernel (this checks the no-AppArmor report; tests/vm covers AppArmor)")
    assert support["enabled"] is False and "no AppArmor" in support["reason"]
    with pytest.raises(HostCapabilityError, match="required, but this host cannot apply it"):
        aa.prepare(AppArmorPlan(profile="sandboxd-judge", required=True), support=support)
    p = aa.prepare(AppArmorPlan(profile="sandboxd-judge"), support=support)
    assert p.transition is None and p.exec_write is None
    assert p.report["reason"] == "not applied (host lacks AppArmor)"
    assert aa.prepare_exec(AppArmorPlan(profile="sandboxd-judge"), support=support) is None


def test_exec_from_unconfined_stack_from_confined():
    t = aa.resolve_transition("sandboxd-judge", "enforce", fake_support(), "sandboxd-judge")
    assert (t.command, t.data) == ("exec", b"exec sandboxd-judge")
    t = aa.resolve_transition("sandboxd-judge.complain", "complain",
                              fake_support(self_label="sandboxd-launcher (enforce)"), "sandboxd-judge")
    assert (t.command, t.data) == ("stack", b"stack sandboxd-judge.complain")
    assert t.attr_path == "/proc/self/attr/apparmor/exec"


def test_verify_compares_with_what_the_kernel_reports():
    t = aa.resolve_transition("sandboxd-judge", "enforce", fake_support(), "sandboxd-judge")
    assert aa.verify(t, "sandboxd-judge (enforce)")["enforced"] is True
    for wrong in ("unconfined", "sandboxd-judge (complain)", "sandboxd-default (enforce)"):
        with pytest.raises(LaunchError, match="the workload runs as"):
            aa.verify(t, wrong)
    s = fake_support(self_label="sandboxd-launcher (enforce)")
    t = aa.resolve_transition("sandboxd-judge", "enforce", s, "sandboxd-judge")
    assert aa.verify(t, "sandboxd-judge//&sandboxd-launcher (enforce)")["confinement"].startswith("sandboxd-judge//&")
    t = aa.resolve_transition("sandboxd-judge.complain", "complain", s, "sandboxd-judge")
    aa.verify(t, "sandboxd-judge.complain//&sandboxd-launcher (mixed)")
    with pytest.raises(LaunchError):
        aa.verify(t, "sandboxd-launcher (enforce)")


def test_parse_confinement():
    assert aa.parse_confinement("unconfined\n") == ("unconfined", None)
    assert aa.parse_confinement("a//&b (mixed)") == ("a//&b", "mixed")


# -- host probe and the kernel's profile list, on fake trees -------------------------------------

def _fake_securityfs(tmp_path: Path, profiles: dict[str, str] | None, policy: dict[str, str]) -> str:
    fs = tmp_path / "apparmor"
    (fs / "policy" / "profiles").mkdir(parents=True)
    if profiles is not None:
        (fs / "profiles").write_text("".join(f"{k} ({v})\n" for k, v in profiles.items()))
    for i, (k, v) in enumerate(policy.items()):
        d = fs / "policy" / "profiles" / f"{k}.{i}"
        d.mkdir()
        (d / "name").write_text(k + "\n")
        (d / "mode").write_text(v + "\n")
    return str(fs)


def test_host_support_reads_the_module_parameter_and_securityfs(tmp_path):
    fs = _fake_securityfs(tmp_path, {}, {})
    param = tmp_path / "enabled"
    param.write_text("Y\n")
    assert aa.host_support(securityfs=fs, enabled_param=str(param))["reason"] is None
    param.write_text("N\n")
    s = aa.host_support(securityfs=fs, enabled_param=str(param))
    assert s["enabled"] is False and "disabled in this kernel" in s["reason"]
    param.write_text("Y\n")
    s = aa.host_support(securityfs=str(tmp_path / "unmounted"), enabled_param=str(param))
    assert s["enabled"] is False and "securityfs is not mounted" in s["reason"]
    s = aa.host_support(securityfs=fs, enabled_param=str(tmp_path / "absent"))
    assert s["enabled"] is False and "has no AppArmor" in s["reason"]


def test_loaded_profiles_from_the_root_list_or_the_policy_tree(tmp_path):
    fs = _fake_securityfs(tmp_path, {"sandboxd-judge": "enforce", "a b (x)": "complain"}, {})
    assert aa.loaded_profiles(fs) == {"sandboxd-judge": "enforce", "a b (x)": "complain"}
    fs2 = _fake_securityfs(tmp_path / "2", None, {"sandboxd-judge": "enforce",
                                                  "sandboxd-judge.complain": "complain"})
    assert aa.loaded_profiles(fs2) == {"sandboxd-judge": "enforce", "sandboxd-judge.complain": "complain"}


def test_unprivileged_sandboxd_checks_and_names_the_missing_profile(tmp_path):
    fs = _fake_securityfs(tmp_path, None, {"sandboxd-judge": "complain"})
    s = fake_support(securityfs=fs)
    path = aa.find_profile("sandboxd-default")
    with pytest.raises(HostCapabilityError) as ei:
        aa.ensure_loaded("sandboxd-default", path, mode="complain", support=s)
    msg = str(ei.value)
    assert "AppArmor profile 'sandboxd-default.complain' is not loaded, and this process" in msg
    assert "-m sandboxd.runtime.apparmor load --complain sandboxd-default" in msg
    with pytest.raises(HostCapabilityError, match="is loaded in complain mode; the plan asks for enforce"):
        aa.ensure_loaded("sandboxd-judge", aa.find_profile("sandboxd-judge"), support=s)
    fs3 = _fake_securityfs(tmp_path / "3", None, {"sandboxd-judge": "enforce"})
    assert aa.ensure_loaded("sandboxd-judge", aa.find_profile("sandboxd-judge"),
                            support=fake_support(securityfs=fs3)) == "sandboxd-judge"


def test_read_confinement_prefers_the_lsm_directory(tmp_path):
    (tmp_path / "7" / "attr" / "apparmor").mkdir(parents=True)
    (tmp_path / "7" / "attr" / "apparmor" / "current").write_text("sandboxd-judge (enforce)\n")
    (tmp_path / "7" / "attr" / "current").write_text("other\n")
    assert aa.read_confinement(7, proc=str(tmp_path)) == "sandboxd-judge (enforce)"
    (tmp_path / "8" / "attr").mkdir(parents=True)
    (tmp_path / "8" / "attr" / "current").write_text("sandboxd-judge (complain)\n")
    assert aa.read_confinement(8, proc=str(tmp_path)) == "sandboxd-judge (complain)"
    with pytest.raises(LaunchError) as ei:
        aa.read_confinement(9, proc=str(tmp_path))
    assert ei.value.step == "apparmor_attest" and ei.value.errno == errno.ENOENT


# -- the kernel interface on this host -----------------------------------------------------------

def test_libapparmor_loads_from_debians_package():
    # scripts/setup.sh installs python3-libapparmor; the venv does not see dist-packages.
    lib = aa.libapparmor()
    assert lib is not None and hasattr(lib, "aa_change_onexec")


@pytest.mark.parametrize("method", ["procfs", "libapparmor"])
def test_apply_exec_fails_loudly_without_apparmor(method):
    if HOST_HAS_APPARMOR:
        pytest.skip("host lacks: an AppArmor-free kernel (this probes the no-AppArmor path; tests/vm covers AppArmor)")
    aa.libapparmor()
    s = aa.host_support()
    t = aa.resolve_transition("sandboxd-judge", "enforce", fake_support(exec_attr=s["exec_attr"]),
                              "sandboxd-judge")
    with pytest.raises(LaunchError) as ei:
        aa.apply_exec(t, method=method)
    # No LSM takes "exec" here: the kernel refuses the write, and the error names it.
    assert ei.value.step == "apparmor_exec" and ei.value.errno == errno.EINVAL


def test_libapparmor_is_used_only_when_proc_is_this_tasks_own():
    # In a fresh process /proc is ours; a child of unshare(CLONE_NEWPID) still seeing the host's
    # /proc is not, and apply_exec then falls back to /proc/self (tests/vm covers both paths).
    assert aa._proc_is_ours() is True
