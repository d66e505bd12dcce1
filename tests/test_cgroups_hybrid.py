"""cgroups on a hybrid host's cgroup2 mount (/sys/fs/cgroup/unified, no controllers on it).

The v2 backend cannot run here through detect() (the controllers are on v1), but its kill code
needs no controller: cgroup.kill and cgroup.freeze are core files. So these tests run that code
on the real kernel, in cgroups they make below the unified root, and check that detect() refuses
a cgroup2 without controllers, naming each. A pure v2 host has no such mount; there the ordinary
tests in test_cgroups_kernel.py run the v2 backend itself.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sandboxd.errors import HostCapabilityError
from sandboxd.plan import Limits
from sandboxd.runtime import cgroups as C

from tests.test_cgroups_kernel import Child, _fork_bomb, _wait_for_bomb, mgr  # noqa: F401 (fixture)

pytestmark = pytest.mark.root

UNIFIED = "/sys/fs/cgroup/unified"


def _unified_or_skip():
    with open("/proc/self/mountinfo") as f:
        if not any(line.split()[4] == UNIFIED and " - cgroup2 " in line for line in f):
            pytest.skip(f"host lacks: a hybrid cgroup2 mount at {UNIFIED}")


def test_v2_detect_names_every_missing_controller_on_a_real_cgroup2():
    _unified_or_skip()
    with open(f"{UNIFIED}/cgroup.controllers") as f:
        offered = set(f.read().split())
    if {"memory", "pids", "cpu"} <= offered:
        pytest.skip("host lacks: a cgroup2 mount without memory/pids/cpu to test the refusal")
    with pytest.raises(HostCapabilityError) as e:
        C.CgroupManager.detect(fs_root=UNIFIED)
    assert e.value.step == "cgroup_detect"
    for c in {"memory", "pids", "cpu"} - offered:
        assert f"{c}: not offered to the base" in e.value.hint


@pytest.mark.parametrize("has_kill", [True, False], ids=["cgroup.kill", "cgroup.freeze"])
def test_v2_kill_paths_on_a_real_cgroup2(mgr, has_kill):
    """The v2 kill code on the real kernel's cgroup2: cgroup.kill, and freeze + SIGKILL (the
    path for kernels before 5.14, called directly: kill_all only escalates to it when a round
    of SIGKILLs does not win). The bomb is bounded by the v1 pids cgroup it is also in."""
    _unified_or_skip()
    inst = os.path.join(UNIFIED, f"sbxtest-{os.getpid()}-{has_kill}")
    os.mkdir(inst)
    v2run = C._V2Run(C.CgroupFs(), "k", os.path.join(inst, "run-k"), proc="/proc",
                     has_kill=has_kill, has_peak=False, has_swap_max=False)
    try:
        v2run._mkdirs()
        v1run = mgr.create("k", Limits(pids=48))
        c = Child(_fork_bomb)
        v1run.add_pid(c.pid)
        v2run.add_pid(c.pid)
        c.go()
        _wait_for_bomb(v2run)
        if has_kill:
            v2run.kill_all()
        else:
            assert v2run._freeze_and_kill(time.monotonic() + 5)
        assert v2run.pids() == [] and v1run.pids() == []
        assert c.wait() is not None and c.killed_by == signal.SIGKILL
        with open(v2run._f("cgroup.freeze")) as f:
            assert f.read().strip() == "0"                     # never left frozen
        v2run.remove()
        assert not os.path.exists(os.path.join(inst, "run-k"))
    finally:
        v2run._has_kill = True                                 # clean up by the surest path
        v2run.remove()
        os.rmdir(inst)
