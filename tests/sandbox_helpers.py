"""Plan builders and a private launcher shared by the runtime's real-kernel tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from sandboxd import planner
from sandboxd.plan import Limits
from tests.conftest import need_root

PY = "/usr/bin/python3"


def landlock_abi() -> int:
    from sandboxd.runtime.hostinfo import landlock_abi as abi
    return abi()


def plan(argv, preset="default", **lim):
    """A default (or judge) plan with generous time limits; `lim` overrides Limits fields."""
    limits = dataclasses.replace(Limits(wall_time_ms=20_000, cpu_time_ms=10_000), **lim)
    p = planner.build_plan(list(argv), preset=preset, limits=limits)
    if landlock_abi() < 6:
        # An older kernel (the VM tier's 6.1 has ABI 2) cannot scope signals and abstract
        # sockets: "required" is refused there (tested in test_landlock_*), so these runs ask
        # for best effort and the rest of Landlock still applies.
        p = dataclasses.replace(p, landlock=dataclasses.replace(p.landlock, mode="best_effort"))
    return p


def py(code, **kw):
    return plan([PY, "-c", code], **kw)


def sh(cmd, preset="default", **kw):
    return plan(["/bin/sh", "-c", cmd], preset=preset, **kw)


def bare(p):
    """The plan without its seccomp filter and Landlock: only namespaces, mounts, caps remain."""
    return dataclasses.replace(p, seccomp=None, landlock=dataclasses.replace(p.landlock, enabled=False))


@contextlib.contextmanager
def private_runtime(tag: str, **cfg):
    """A launcher of its own (instance esc<tag><pid>), for tests that may hurt their launcher."""
    need_root()
    from sandboxd.runtime.client import Runtime
    from sandboxd.runtime.config import RuntimeConfig
    inst = f"esc{tag}{os.getpid()}"
    rt = Runtime(RuntimeConfig(instance=inst, **cfg))
    try:
        yield rt
    finally:
        rt.close()
        cfg2 = RuntimeConfig(instance=inst, prefork=0)
        Runtime(cfg2).close()
        # The launcher leaves its instance lock file behind; this instance is ours alone.
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(os.path.dirname(os.path.abspath(cfg2.root_mountpoint)),
                                   f"instance-{inst}.lock"))
