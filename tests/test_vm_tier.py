"""The VM tier, seen from the host: boot the guest once (tests/vm/run_vm_tests.py), let it run the
AppArmor, cgroup v2 and runtime tests of tests/vm/SELECTION as root on Debian's kernel, and fail
here when any of them failed, skipped or did not run.

This host's kernel has no AppArmor and keeps memory on cgroup v1, so these tests are where both
are proved. In CI (CI=true) a tier that is not set up is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RUNNER = os.path.join(ROOT, "tests", "vm", "run_vm_tests.py")
RESULTS = os.path.join(ROOT, ".cache", "vm-results")
CI = os.environ.get("CI", "").lower() == "true"
# Boot (~30 s) plus the selection under emulation; the runner stops the VM at 13 min.
pytestmark = pytest.mark.timeout(960)

# Tests the guest must have run, so a selection or collection that silently lost them fails.
MUST_RUN = (
    "test_judge_enforce_denies_with_the_kernels_errno[procfs]",
    "test_judge_enforce_denies_with_the_kernels_errno[libapparmor]",
    "test_judge_complain_lets_it_through_and_logs",
    "test_unconfined_control_can_do_everything",
    "test_confined_sandboxd_stacks_because_no_new_privs_forbids_exec",
    "test_memory_max_oom_kills_a_real_allocation",
    "test_cgroup_kill_ends_every_process",
    "test_rootless_user_runs_cgroups_in_a_delegated_subtree",
)


@pytest.fixture(scope="module")
def vm() -> dict:
    chk = subprocess.run([sys.executable, RUNNER, "--check"], capture_output=True, text=True)
    if chk.returncode == 3:
        msg = chk.stderr.strip()
        if CI:
            pytest.fail(f"CI must run the VM tier: {msg}")
        pytest.skip(f"host lacks: the VM tier (apparmor, cgroup v2 are proved there): {msg}")
    assert chk.returncode == 0, chk.stderr
    r = subprocess.run([sys.executable, RUNNER, "--results", RESULTS], capture_output=True,
                       text=True, timeout=900)
    try:
        with open(os.path.join(RESULTS, "summary.json")) as f:
            s = json.load(f)
    except OSError:
        pytest.fail(f"the VM runner wrote no summary (exit {r.returncode}):\n{r.stderr[-3000:]}")
    s["console_tail"] = (r.stdout + r.stderr)[-6000:]
    return s


def test_the_guest_ran_to_the_end(vm):
    assert vm["outcome"] in ("passed", "failed"), (
        f"the VM did not bring pytest's exit status back in {vm.get('attempts')} boot(s) (timed out: "
        f"{vm['timed_out']}, stalled: {vm.get('stalled')}, "
        f"after {vm['elapsed_s']} s); console:\n{vm['console_tail']}")


def test_the_guest_is_what_the_tier_promises(vm):
    g = vm["guest"]
    assert g.get("apparmor") == "Y" and "apparmor" in g.get("lsm", ""), g
    assert g.get("cgroup_v1_mounts") == "0", g
    assert {"memory", "pids", "cpu"} <= set(g.get("cgroup2_controllers", "").split()), g


def test_every_vm_test_passed(vm):
    j = vm["junit"]
    assert j["tests"] > 0 and j.get("junit_error") is None, j
    assert j["failed_tests"] == [] and vm["pytest_exit_status"] == 0, (
        f"failed in the VM: {j['failed_tests']}\n{vm['console_tail']}")


def test_nothing_in_the_vm_skipped(vm):
    # The guest is built to run every test of the tier: a skip there means a broken guest.
    assert vm["junit"]["skipped_tests"] == []


def test_the_key_enforcement_tests_ran(vm):
    ran = {n.split("::", 1)[1] for n in vm["junit"]["test_names"]}
    assert [t for t in MUST_RUN if t not in ran] == []


def _runner():
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_vm_tests", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runner_counts_failures_errors_and_skips(tmp_path):
    # No VM: the part of the runner that decides what the host test sees.
    j = tmp_path / "junit.xml"
    j.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="a" name="ok"/>
      <testcase classname="a" name="bad"><failure message="x"/></testcase>
      <testcase classname="b" name="err"><error message="y"/></testcase>
      <testcase classname="b" name="sk"><skipped message="host lacks: z"/></testcase>
    </testsuite></testsuites>""")
    s = _runner().parse_junit(str(j))
    assert (s["tests"], s["passed"], s["failures"], s["errors"], s["skipped"]) == (4, 1, 1, 1, 1)
    assert s["failed_tests"] == ["a::bad", "b::err"] and s["skipped_tests"] == ["b::sk: host lacks: z"]
    assert "junit_error" in _runner().parse_junit(str(tmp_path / "missing.xml"))


def test_runner_guest_script_reports_status_last():
    script = _runner().guest_script("/r", ["-k", "x y"])
    lines = script.strip().splitlines()
    assert lines[-1] == "echo $? > /r/exit_status.tmp && mv /r/exit_status.tmp /r/exit_status"
    assert "--junitxml=/r/junit.xml" in lines[-2] and "'x y'" in lines[-2]
    assert "export SANDBOXD_VM_TIER=1" in script and "tests/vm/test_apparmor_vm.py" in script


def test_runner_boots_again_only_when_no_exit_status_came_back(tmp_path, monkeypatch):
    """A stalled or timed-out guest (no exit status) is booted once more; failed tests never."""
    mod = _runner()
    outcomes: list[str] = []

    def fake_boot(results, timeout, memory, cpus, pytest_args):
        os.makedirs(results, exist_ok=True)
        with open(os.path.join(results, "console.log"), "w") as f:
            f.write("....")
        outcome = outcomes.pop(0)
        return {"outcome": outcome, "elapsed_s": 1.0, "timed_out": False,
                "stalled": outcome == "incomplete", "junit": {}}
    monkeypatch.setattr(mod, "_boot", fake_boot)
    outcomes[:] = ["incomplete", "passed"]
    s = mod.run(str(tmp_path / "r1"), 10, "2G", 2, [])
    assert s["outcome"] == "passed" and s["attempts"] == 2
    assert s["earlier_attempts"][0]["stalled"] and s["earlier_attempts"][0]["console_tail"] == "...."
    outcomes[:] = ["failed", "passed"]
    s = mod.run(str(tmp_path / "r2"), 10, "2G", 2, [])
    assert s["outcome"] == "failed" and s["attempts"] == 1 and outcomes == ["passed"]
    outcomes[:] = ["incomplete", "incomplete", "passed"]
    s = mod.run(str(tmp_path / "r3"), 10, "2G", 2, [])
    assert s["outcome"] == "incomplete" and s["attempts"] == 2
    with open(tmp_path / "r3" / "summary.json") as f:
        assert json.load(f)["attempts"] == 2
