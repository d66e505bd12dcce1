"""Admission: a global and a per-tenant limit on running sandboxes, with a bounded FIFO queue.

A request either gets a slot at once, waits in the queue (bounded globally and per tenant), or is
refused with ResourceExhausted. Waiters are served in arrival order among those that could run:
a waiter blocked only by its own tenant's limit does not hold up other tenants. Waiting ends when
a slot frees, the caller's cancel event is set (call `kick()` after setting it), the deadline
passes, or the server shuts down.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from sandboxd.errors import ResourceExhausted, SandboxError


class Cancelled(SandboxError):
    """The caller went away (cancelled or deadline) before the run started (gRPC CANCELLED)."""


class ShuttingDown(SandboxError):
    """The server is stopping and takes no new runs (gRPC UNAVAILABLE)."""


@dataclass(eq=False)
class _Waiter:
    tenant: str
    tenant_max: int
    granted: bool = False


@dataclass
class Snapshot:
    running: int
    queued: int
    running_by_tenant: dict[str, int] = field(default_factory=dict)
    queued_by_tenant: dict[str, int] = field(default_factory=dict)


class Admission:
    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._running = 0
        self._running_by: dict[str, int] = {}
        self._queue: deque[_Waiter] = deque()
        self._queued_by: dict[str, int] = {}
        self._closed = False

    def _can_run(self, tenant: str, tenant_max: int) -> bool:
        return self._running < self.max_running and self._running_by.get(tenant, 0) < tenant_max

    def _grant(self, tenant: str) -> None:
        self._running += 1
        self._running_by[tenant] = self._running_by.get(tenant, 0) + 1

    def acquire(self, tenant: str, tenant_max_running: int, tenant_max_queued: int,
                cancel: threading.Event | None = None, deadline: float | None = None) -> "Slot":
        """Block until the run may start; returns a Slot to release (use as a context manager)."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down", step="admit")
            # Every release dispatches, so any waiter still queued cannot run now: taking a free
            # slot here jumps nobody who could have had it.
            if self._can_run(tenant, tenant_max_running):
                self._grant(tenant)
                return Slot(self, tenant)
            if len(self._queue) >= self.max_queued:
                raise ResourceExhausted(
                    f"{self._running} sandboxes running and {len(self._queue)} requests queued "
                    f"(server max_queued {self.max_queued})", step="admit",
                    hint="retry later with backoff")
            if self._queued_by.get(tenant, 0) >= tenant_max_queued:
                raise ResourceExhausted(
                    f"tenant '{tenant}' has {self._running_by.get(tenant, 0)} running and "
                    f"{self._queued_by.get(tenant, 0)} queued (policy concurrency.max_queued "
                    f"{tenant_max_queued})", step="admit", hint="retry later with backoff")
            w = _Waiter(tenant, tenant_max_running)
            self._queue.append(w)
            self._queued_by[tenant] = self._queued_by.get(tenant, 0) + 1
            try:
                while True:
                    self._dispatch()
                    if w.granted:
                        return Slot(self, tenant)
                    if self._closed:
                        raise ShuttingDown("the server is shutting down", step="admit")
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled while queued", step="admit")
                    timeout = None
                    if deadline is not None:
                        timeout = deadline - time.monotonic()
                        if timeout <= 0:
                            raise Cancelled("deadline passed while queued", step="admit")
                    self._cond.wait(timeout)
            finally:
                if not w.granted:
                    self._remove(w)
                    self._cond.notify_all()   # our place may have been blocking nobody, but be fair

    def _dispatch(self) -> None:
        """Grant slots to queued waiters, in order, that can run now."""
        granted = False
        for w in list(self._queue):
            if self._running >= self.max_running:
                break
            if self._can_run(w.tenant, w.tenant_max):
                self._remove(w)
                self._grant(w.tenant)
                w.granted = True
                granted = True
        if granted:
            self._cond.notify_all()

    def _remove(self, w: _Waiter) -> None:
        try:
            self._queue.remove(w)
        except ValueError:
            return
        n = self._queued_by.get(w.tenant, 1) - 1
        if n:
            self._queued_by[w.tenant] = n
        else:
            self._queued_by.pop(w.tenant, None)

    def release(self, tenant: str) -> None:
        with self._cond:
            self._running -= 1
            n = self._running_by.get(tenant, 1) - 1
            if n:
                self._running_by[tenant] = n
            else:
                self._running_by.pop(tenant, None)
            self._dispatch()
            self._cond.notify_all()

    def resize(self, max_running: int, max_queued: int) -> None:
        """New limits (on reload); more room lets queued requests start at once."""
        with self._cond:
            self.max_running = max_running
            self.max_queued = max_queued
            self._dispatch()
            self._cond.notify_all()

    def kick(self) -> None:
        """Wake waiters so they notice a cancel event that was just set."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse new requests and wake every waiter (they get ShuttingDown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def snapshot(self) -> Snapshot:
        with self._cond:
            return Snapshot(self._running, len(self._queue), dict(self._running_by),
                            dict(self._queued_by))


class Slot:
    def __init__(self, adm: Admission, tenant: str) -> None:
        self._adm = adm
        self._tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._adm.release(self._tenant)

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
