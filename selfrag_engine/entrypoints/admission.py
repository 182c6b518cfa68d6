"""Admission counted in work: a request takes as many of the server's row slots as sequences it runs at once
(`request_rows`: n x prompts for completions, the branches of a Self-RAG query), and gives them back when its
response ends (a stream's last event, or the client's hang-up).

A request needing more than the per-request share (`BodyChecks.max_request_rows`, a quarter of the slots by
default) could never be served and is refused with 400 before it gets here (`server_limits`); one that fits
the share but not the slots free now is a 429 whose Retry-After comes from the queue: the rows to wait for,
divided by the rate at which rows were given back lately (at least 1 s).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque

from starlette.types import ASGIApp, Receive, Scope, Send

from selfrag_engine.entrypoints.body_guard import parsed_body
from selfrag_engine.entrypoints.openai_errors import error
from selfrag_engine.entrypoints.server_limits import request_rows

ADMITTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/selfrag"})


class Admission:
    """Row slots shared by every request; thread-safe."""

    def __init__(self, capacity: int, window: int = 64):
        if capacity < 1:
            raise ValueError(f"the admission bound must be at least 1, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()
        self._released: deque[tuple[float, int]] = deque(maxlen=window)  # (when, rows) given back

    def try_take(self, rows: int) -> bool:
        with self._lock:
            if self.used + rows > self.capacity:
                return False
            self.used += rows
            return True

    def give_back(self, rows: int) -> None:
        with self._lock:
            self.used -= rows
            self._released.append((time.monotonic(), rows))

    def retry_after(self, rows: int) -> int:
        """Seconds until `rows` slots are likely free, from the rate rows were given back lately."""
        with self._lock:
            missing = self.used + rows - self.capacity
            events = list(self._released)
        if missing <= 0 or len(events) < 2:
            return 1
        span = events[-1][0] - events[0][0]
        freed = sum(r for _, r in events[1:])
        if span <= 0 or freed <= 0:
            return 1
        return max(1, min(600, math.ceil(missing * span / freed)))


class AdmissionGate:
    """ASGI middleware: takes a request's rows before the app runs, gives them back when it returns."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ADMITTED_PATHS:
            return await self.app(scope, receive, send)
        rows = min(request_rows(scope["path"], parsed_body(scope)), self.admission.capacity)
        if not self.admission.try_take(rows):
            wait = self.admission.retry_after(rows)
            return await error(429, f"the server is busy: this request needs {rows} of its "
                                    f"{self.admission.capacity} row slots and {self.admission.used} are in use; "
                                    f"retry in {wait} s", kind="rate_limit_exceeded", code="busy",
                               headers={"Retry-After": str(wait)})(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.give_back(rows)
