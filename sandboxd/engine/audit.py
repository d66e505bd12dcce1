"""The audit log: one JSON object per line for every decision and every run.

Who (tenant, how authenticated, peer), what was asked (argv, digests of the files and stdin, the
plan's digest, labels), which policy decided (name and the policy set's digest), and the outcome.
Each record is written with a single write() to an O_APPEND file, so concurrent records never
interleave and a crash loses at most the record being written.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import threading
from typing import Any


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is None:
            return
        if path == "-":
            self._fd = sys.stderr.fileno()
            return
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        # Not world-readable: argv and labels may carry what a tenant considers private.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        rec = {"ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
               "event": event}
        rec.update(fields)
        line = (json.dumps(rec, sort_keys=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError as e:   # never fail a run because the log is full; say so on stderr
                print(f"sandboxd: audit log write failed: {e}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self.path not in (None, "-"):
                os.close(self._fd)
            self._fd = None
