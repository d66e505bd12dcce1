"""`none` through the real runtime: the sandbox reaches nothing, not even the host's loopback.

The host side runs a TCP listener on its own 127.0.0.1 and an abstract unix socket, and proves
both answer from the host (the positive twin); the sandboxed probe must not reach either. With
Landlock off, only the network namespace stands between them (the probe sees its own, empty
loopback: ECONNREFUSED; abstract names are per network namespace: ECONNREFUSED). With the
default plan Landlock also refuses TCP connect (EACCES): either way, never "OK".
"""

from __future__ import annotations

import os
import secrets

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("host lacks: root (the runtime's per-run uids and cgroups)",
                allow_module_level=True)

from sandboxd import planner  # noqa: E402
from sandboxd.plan import Status  # noqa: E402
from sandboxd.runtime.client import Runtime  # noqa: E402

from tests.test_network import AGENT, PY, _run, _serve  # noqa: E402

PYTHON = "/usr/bin/python3"       # the host's, reached through the sandbox's read-only /usr


# `runtime`: the session's launcher (tests/conftest.py), with an instance of its own.


@pytest.fixture
def host_listeners():
    name = f"sbxt-{secrets.token_hex(4)}"
    tcp, port = _serve([], "tcp", "127.0.0.1", 0)
    unix, _ = _serve([], "unix", name, 0)
    try:
        assert _run(PY + ["connect", "tcp", "127.0.0.1", str(port), "1"]) == "OK 127.0.0.1 ping"
        assert _run(PY + ["connect", "unix", name, "0", "1"]) == "OK unix ping"
        yield port, name
    finally:
        for p in (tcp, unix):
            p.kill()
            p.wait()


def _probe(rt: Runtime, *args: str, landlock: bool | None = None) -> str:
    plan = planner.build_plan([PYTHON, "-I", "-S", "-c", AGENT, "connect", *args],
                              landlock=landlock)
    r = rt.run(plan)
    assert r.status == Status.OK, (r.status, r.stderr)
    assert r.attestation["network"]["mode"] == "none"
    return r.stdout.decode().strip()


def test_none_namespace_alone_blocks_host_loopback_and_abstract_sockets(runtime, host_listeners):
    port, name = host_listeners
    assert _probe(runtime, "tcp", "127.0.0.1", str(port), "1", landlock=False) == "ERR ECONNREFUSED"
    assert _probe(runtime, "unix", name, "0", "1", landlock=False) == "ERR ECONNREFUSED"


def test_none_default_plan_blocks_host_loopback_and_abstract_sockets(runtime, host_listeners):
    port, name = host_listeners
    assert _probe(runtime, "tcp", "127.0.0.1", str(port), "1") in ("ERR ECONNREFUSED",
                                                                    "ERR EACCES")
    assert _probe(runtime, "unix", name, "0", "1") in ("ERR ECONNREFUSED", "ERR EPERM")


def test_none_sees_loopback_only(runtime):
    plan = planner.build_plan([PYTHON, "-I", "-S", "-c",
                               "import socket; print([n for _, n in socket.if_nameindex()])"])
    r = runtime.run(plan)
    assert r.status == Status.OK, r.stderr
    assert r.stdout.decode().strip() == "['lo']"
