"""The runtime as a library: start one launcher process, run plans through it.

`Runtime` is thread-safe: each run has its own socket pair to the launcher; only the send of the
RUN frame on the shared control socket is serialised. The launcher is started with this
process's own interpreter (`sys.executable`, never a shim on PATH) and `-m`, so it imports
nothing of grpc and runs no threads.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
from typing import Callable

from sandboxd.errors import SandboxError
from sandboxd.plan import DeniedSyscall, Plan, Result, Status
from sandboxd.runtime import protocol
from sandboxd.runtime.config import RuntimeConfig

OutputCallback = Callable[[str, bytes], None]


class _ForkedLauncher:
    """The launcher as a fork of this process (see Runtime(start="fork"))."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self, timeout: float | None = None) -> int:
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                return status
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("sandboxd-launcher", timeout)
            time.sleep(0.005)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


class Runtime:
    """start="exec" (the default, and the only choice in a threaded process such as the gRPC
    daemon): the launcher is a fresh interpreter. start="fork": the launcher is a fork of this
    process, which must be single-threaded and must not have imported grpc; it saves an
    interpreter start and the imports (the local CLI uses it)."""

    def __init__(self, config: RuntimeConfig | None = None, *, start: str = "exec") -> None:
        self.config = config or RuntimeConfig()
        parent, child = protocol.seqpacket_pair()
        self._ctl = parent
        self._lock = threading.Lock()
        if start == "fork":
            if threading.active_count() != 1 or "grpc" in sys.modules:
                raise SandboxError("start='fork' needs a single-threaded process without grpc",
                                   step="launcher")
            from sandboxd.runtime import launcher
            pid = os.fork()
            if pid == 0:
                try:
                    parent.close()
                    launcher.run_launcher(child, self.config)
                finally:
                    os._exit(0)
            self._proc = _ForkedLauncher(pid)
        elif start == "exec":
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sandboxd.runtime.launcher", "--ctl-fd", str(child.fileno()),
                 "--config", _json(self.config.to_dict())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        else:
            raise SandboxError(f"unknown launcher start mode {start!r}", step="launcher")
        child.close()
        kind, payload, _ = protocol.recv(self._ctl)
        if kind == protocol.ERROR:
            self._proc.wait()
            raise SandboxError.from_dict(protocol.loads(payload))
        if kind != protocol.GO:
            self._proc.kill()
            raise SandboxError("launcher did not start", step="launcher")
        self._host = protocol.loads(payload)["host"]
        self._closed = False

    def host_info(self) -> dict:
        return self._host

    def run(self, plan: Plan, stdin: bytes | str | int | None = None,
            on_output: OutputCallback | None = None,
            cancel: threading.Event | None = None) -> Result:
        """Run one plan. Sandbox failures raise SandboxError; the workload's outcome is the Result."""
        if self._closed:
            raise SandboxError("runtime is closed", step="run")
        if not isinstance(plan, Plan):
            raise SandboxError(f"run() takes a Plan, got {type(plan).__name__}", step="run")
        mine, theirs = protocol.seqpacket_pair()
        stdin_fd = _stdin_fd(stdin)
        try:
            with self._lock:
                # Pickled, not JSON: the control socket joins two processes of this program
                # (same code, same trust), and decoding JSON into the dataclass tree costs the
                # launcher more than the rest of its per-run work.
                protocol.send(self._ctl, protocol.RUN, pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL),
                              fds=[theirs.fileno(), stdin_fd])
        except OSError as e:
            raise SandboxError("launcher is gone", step="launcher", errno=e.errno) from None
        finally:
            theirs.close()
            os.close(stdin_fd)
        out = {"stdout": bytearray(), "stderr": bytearray()}
        if cancel is not None:
            mine.settimeout(0.05)
        cancel_sent = False
        try:
            while True:
                try:
                    kind, payload, fds = protocol.recv(mine)
                except socket.timeout:
                    if cancel is not None and cancel.is_set() and not cancel_sent:
                        try:
                            protocol.send(mine, protocol.CANCEL)
                        except OSError:
                            pass
                        cancel_sent = True
                    continue
                for fd in fds:
                    os.close(fd)
                if kind in (protocol.OUT1, protocol.OUT2):
                    name = "stdout" if kind == protocol.OUT1 else "stderr"
                    if on_output is not None:
                        on_output(name, payload)
                    else:
                        out[name] += payload
                elif kind == protocol.RESULT:
                    return _result(protocol.loads(payload), out)
                elif kind == protocol.ERROR:
                    raise SandboxError.from_dict(protocol.loads(payload))
                elif kind == b"":
                    raise SandboxError("launcher closed the run without a result", step="launcher")
        finally:
            mine.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ctl.close()          # EOF: the launcher kills what runs, cleans up and exits
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stdin_fd(stdin: bytes | str | int | None) -> int:
    if stdin is None:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    if isinstance(stdin, (bytes, bytearray)):
        fd = os.memfd_create("sandboxd-stdin", os.MFD_CLOEXEC)
        os.write(fd, stdin)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    if isinstance(stdin, str):
        try:
            return os.open(stdin, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SandboxError("cannot open stdin file", step="stdin", path=stdin, errno=e.errno) from None
    return os.dup(stdin)


def _result(d: dict, out: dict) -> Result:
    d.pop("signal_name", None)
    d["status"] = Status(d["status"])
    d["denied_syscalls"] = [DeniedSyscall(**x) for x in d.get("denied_syscalls", [])]
    res = Result(**d)
    res.stdout = bytes(out["stdout"])
    res.stderr = bytes(out["stderr"])
    return res


def _json(d: dict) -> str:
    import json
    return json.dumps(d)
