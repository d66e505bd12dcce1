"""The public unix socket: accept, read the peer's SO_PEERCRED, relay bytes to gRPC.

Theory of operation. gRPC Python hides the accepted socket, so a servicer cannot ask the kernel
who the peer is. We therefore own the public socket: for each accepted connection we read
SO_PEERCRED (uid, gid, pid, filled in by the kernel at connect time, unforgeable), open a new
connection to gRPC's internal socket *from* a socket bound to `<peer_dir>/<uid>.<gid>.<pid>.<nonce>`
(the bound path is removed at once; the address stays attached to the connection), and relay bytes
both ways. gRPC reports that bound address as `context.peer()`, and auth.py reads the uid from it.

Why this is sound: the internal socket and peer_dir live in a 0700 directory of the daemon's, so
only the daemon can connect to gRPC directly or bind addresses there; any other peer address is
treated as unidentified. The relay adds one copy per direction (about 0.05 ms per call here).
"""

from __future__ import annotations

import errno as _errno
import grp
import os
import socket
import stat
import struct
import threading
from typing import Callable

from sandboxd.api.auth import peer_address_name
from sandboxd.errors import SandboxError

_BUF = 256 << 10


class UnixFront:
    def __init__(self, public_path: str, mode: int, group: str | None, upstream_path: str,
                 peer_dir: str, max_connections: int, log: Callable[[str], None]) -> None:
        self.public_path = public_path
        self.mode = mode
        self.group = group
        self.upstream_path = upstream_path
        self.peer_dir = peer_dir
        self.max_connections = max_connections
        self.log = log
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # sun_path holds 107 bytes; the longest peer address is uid.gid.pid.nonce at full width.
        longest = len(os.path.join(self.peer_dir, "4294967295.4294967295.4194304.0123456789abcdef"))
        for path, n in ((self.public_path, len(self.public_path)),
                        (self.upstream_path, len(self.upstream_path)), (self.peer_dir, longest)):
            if n > 107:
                raise SandboxError("unix socket path too long (at most 107 bytes)", step="listen_unix",
                                   path=path, hint="use a shorter listen.unix.path or state_dir")
        os.makedirs(os.path.dirname(self.public_path) or ".", mode=0o755, exist_ok=True)
        os.makedirs(self.peer_dir, mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(self.peer_dir), 0o700)
        self._remove_stale(self.public_path)
        # Bind under a temporary name, set mode and group, then rename into place: the final
        # path never exists with looser permissions.
        tmp = f"{self.public_path}.{os.getpid()}.tmp"
        with _suppress_enoent():
            os.unlink(tmp)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(tmp)
            os.chmod(tmp, self.mode)
            if self.group is not None:
                try:
                    gid = grp.getgrnam(self.group).gr_gid
                except KeyError:
                    raise SandboxError(f"unknown group '{self.group}'", step="listen_unix",
                                       path=self.public_path, hint="create the group or fix "
                                       "listen.unix.group") from None
                os.chown(tmp, -1, gid)
            s.listen(512)
            os.rename(tmp, self.public_path)
        except OSError as e:
            s.close()
            with _suppress_enoent():
                os.unlink(tmp)
            raise SandboxError("cannot listen on the unix socket", step="listen_unix",
                               path=self.public_path, errno=e.errno) from None
        self._listener = s
        self._thread = threading.Thread(target=self._accept_loop, name="unix-front", daemon=True)
        self._thread.start()

    def _remove_stale(self, path: str) -> None:
        """Remove a socket file left by a dead daemon; refuse to steal a live one."""
        if not os.path.lexists(path):
            return
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SandboxError("the socket path exists and is not a socket", step="listen_unix",
                               path=path, hint="fix listen.unix.path; nothing was removed")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno in (_errno.ECONNREFUSED, _errno.ENOENT):
                os.unlink(path)
                self.log(f"removed stale socket {path}")
                return
            raise SandboxError("cannot probe the existing socket", step="listen_unix", path=path,
                               errno=e.errno) from None
        finally:
            probe.close()
        raise SandboxError("another process is listening on the socket", step="listen_unix",
                           path=path, hint="stop the other sandboxd, or set listen.unix.path")

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            with self._lock:
                too_many = len(self._conns) >= self.max_connections
            if too_many or self._closed:
                conn.close()
                continue
            try:
                self._relay(conn)
            except OSError as e:
                self.log(f"unix front: cannot relay a connection: {e}")
                conn.close()

    def _relay(self, conn: socket.socket) -> None:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        addr = os.path.join(self.peer_dir, peer_address_name(uid, gid, pid))
        try:
            up.bind(addr)
            try:
                up.connect(self.upstream_path)
            finally:
                os.unlink(addr)   # the connection keeps the address; the file is not needed
        except OSError:
            up.close()
            raise
        with self._lock:
            self._conns.update((conn, up))
        pair = _Pair()
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self._pump, args=(a, b, pair, conn, up), daemon=True,
                             name=f"relay-{uid}").start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: "_Pair",
              conn: socket.socket, up: socket.socket) -> None:
        buf = bytearray(_BUF)
        view = memoryview(buf)
        clean = False
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    clean = True
                    break
                dst.sendall(view[:n])
        except OSError:
            pass
        if clean:
            with _suppress_oserror():
                dst.shutdown(socket.SHUT_WR)   # pass the half-close on
        else:
            # A reset on one side ends both directions, so the other pump does not wait forever.
            for x in (conn, up):
                with _suppress_oserror():
                    x.shutdown(socket.SHUT_RDWR)
        if pair.finish():
            self._close_pair(conn, up)

    def _close_pair(self, conn: socket.socket, up: socket.socket) -> None:
        with self._lock:
            if conn not in self._conns:
                return
            self._conns.discard(conn)
            self._conns.discard(up)
        for s in (conn, up):
            with _suppress_oserror():
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop_accepting(self) -> None:
        self._closed = True
        if self._listener is not None:
            with _suppress_oserror():
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
            with _suppress_enoent():
                os.unlink(self.public_path)

    def close(self) -> None:
        self.stop_accepting()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            with _suppress_oserror():
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class _Pair:
    """Counts the two pumps of a connection; the second to finish closes both sockets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = 2

    def finish(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: object, e: object, tb: object) -> bool:
        return isinstance(e, OSError)


class _suppress_enoent:
    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: object, e: object, tb: object) -> bool:
        return isinstance(e, FileNotFoundError)
