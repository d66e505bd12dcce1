"""The VM tier's tests run only inside the guest that tests/vm/run_vm_tests.py boots.

On the host they are not collected at all (not skipped): tests/test_vm_tier.py boots the VM and
fails when anything in here fails or skips. Inside the guest (SANDBOXD_VM_TIER=1) they run as
root on Debian's kernel with AppArmor and pure cgroup v2; they check those facts first and fail,
never skip, when the guest is not what they need.
"""

from __future__ import annotations

import os

import pytest

IN_VM = os.environ.get("SANDBOXD_VM_TIER") == "1"

if not IN_VM:
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session", autouse=True)
def _in_guest() -> None:
    if not IN_VM:
        pytest.fail("tests/vm runs inside the VM tier only: use tests/vm/run_vm_tests.py")
    if os.geteuid() != 0:
        pytest.fail("the VM tier runs as root in the guest")
