"""Framing for the launcher's sockets: one SOCK_SEQPACKET message = one frame.

A frame is one type byte followed by a payload (JSON for control frames, raw bytes for output
chunks); file descriptors ride along as SCM_RIGHTS. Every socket is created CLOEXEC, so nothing
leaks into a workload by accident: the workload gets exactly the fds the runtime dup2()s for it.

Frames
  client -> launcher (control socket)  RUN  pickled Plan (our own two processes), fds [run socket, stdin]
  launcher/supervisor -> client (run)  OUT1/OUT2 output chunks, RESULT/ERROR JSON at the end
  client -> supervisor (run socket)    CANCEL
  supervisor -> launcher               FORKED {"init_pid"}, REPORT {...} at the end
  launcher -> supervisor -> init       PLACED {"uid","gid","net"}: mapped and in the cgroup (the
                                       supervisor's copy is pickled and adds its RunCgroup)
  init -> supervisor -> launcher       NAMESPACED: init has its own namespaces (a segment may attach)
  supervisor -> (spawner) -> init     (init socket) "F<pid>" from the spawner; PLACED "<uid> <gid> <net>",
                                       NAMESPACED from init; LAYOUT <blob> (stubgo.encode_layout)
  launcher -> supervisor               LAYOUT pickled LayoutContext, then LAYOUT_BLOB <blob>: build the
                                       root, stage the workload
  init -> supervisor (sync)            STAGED {status, ns, landlock counts}, ERROR {...}
  workload -> supervisor (sync)        WAITING: the workload runs and waits for its GO frame
  launcher -> supervisor               HURRY: a run waits for this spare (after LAYOUT_BLOB, before START)
  supervisor -> launcher               READY + [the supervisor's end of the sync socket]
  launcher -> stub (sync)              the stub's GO frame (stubgo.encode; no kind byte), fds [stdin]
  launcher -> supervisor               START pickled RunStart, fds [run socket]
  stub -> supervisor (sync)            EXEC "<ns>\0<status>\0<limits>" + [seccomp listener fd], ERROR {...}
  supervisor -> client (run)           RESULT of a run that reached its program
  launcher <-> host worker             PREPARE / REMOVE / ATTACH / DETACH requests and answers (pickled)
  launcher <-> zygote                  SPAWN {"uid","gid"} -> SPAWNED {"pid"} + [supervisor socket, pidfd]
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

RUN = b"R"
OUT1 = b"1"
OUT2 = b"2"
RESULT = b"Z"
ERROR = b"E"
CANCEL = b"C"
FORKED = b"F"
GO = b"G"
REPORT = b"P"
EXEC = b"X"
LAYOUT = b"U"
STAGED = b"T"
WAITING = b"W"
SPAWN = b"B"
SPAWNED = b"H"
READY = b"Y"
START = b"S"
PLACED = b"L"
PREPARE = b"Q"
REMOVE = b"D"
ATTACH = b"N"
DETACH = b"O"
NAMESPACED = b"M"
LAYOUT_BLOB = b"V"
HURRY = b"K"

MAX_FRAME = 1 << 17


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def send(sock: socket.socket, kind: bytes, payload: Any = None, fds: list[int] | tuple[int, ...] = ()) -> None:
    if payload is None:
        data = kind
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        data = kind + bytes(payload)
    else:
        data = kind + json.dumps(payload, separators=(",", ":")).encode()
    # Always sendmsg(): after the workload installs its seccomp filter, sendmsg on its sync
    # socket is the one socket call the filter is known to allow.
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def send_raw(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """One frame exactly as given (the stub's GO frame has its own header)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def recv(sock: socket.socket, maxfds: int = 4, nonblocking: bool = False) -> tuple[bytes, bytes, list[int]]:
    """-> (kind, payload bytes, fds). kind is b"" at EOF. nonblocking: BlockingIOError when
    nothing is queued."""
    data, anc, flags, _ = sock.recvmsg(MAX_FRAME, socket.CMSG_SPACE(maxfds * 4),
                                       socket.MSG_CMSG_CLOEXEC | (socket.MSG_DONTWAIT if nonblocking else 0))
    fds: list[int] = []
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - (len(cdata) % a.itemsize)])
            fds.extend(a)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise FrameError(f"frame larger than {MAX_FRAME} bytes (or too many fds): truncated")
    if not data:
        return b"", b"", fds
    return data[:1], data[1:], fds


class FrameError(OSError):
    """A frame that cannot be taken as sent (truncated). Fails the one channel, not the process."""


def loads(payload: bytes) -> Any:
    return json.loads(payload) if payload else None
