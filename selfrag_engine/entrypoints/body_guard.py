"""An ASGI middleware that reads a request's body under the server's bounds before the app sees it.

The body is read chunk by chunk: past `max_body_bytes` (or a Content-Length saying so) it is 413 before more is
read; a body that takes longer than `body_timeout_s` is 408. A complete body is parsed once (`parse_json`:
UTF-8, finite numbers, bounded digits and nesting) and its fields' sizes checked (`BodyChecks`), each a 400 in
OpenAI's shape naming the field, before FastAPI builds a request model from it. The parsed body is left in
`scope["selfrag.body"]` for the middlewares after this one (admission), and replayed to the app as JSON (so
the app reads exactly what was checked), whose later `receive()` calls (a client's disconnect) pass through.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfrag_engine.entrypoints.openai_errors import error
from selfrag_engine.entrypoints.server_limits import BodyChecks, LimitError, parse_json

BODY_KEY = "selfrag.body"


class BodyGuard:
    def __init__(self, app: ASGIApp, checks: BodyChecks):
        self.app = app
        self.checks = checks
        self.limits = checks.limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            if body:
                parsed = parse_json(body, self.limits)
                self.checks.check(scope["path"], parsed)
                scope[BODY_KEY] = parsed
                # What the app parses is what was checked (numbers without a fraction made integers).
                body = json.dumps(parsed).encode()
        except LimitError as e:
            headers = {"Connection": "close"} if e.status in (408, 413) else None
            return await error(e.status, e.message, e.param, code=e.code, headers=headers)(scope, receive, send)
        except _Gone:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        except asyncio.CancelledError:
            # A handler gives up with CancelledError when its client hangs up (its work is cancelled, its
            # blocks freed); nobody is left to answer. A cancellation of this task itself goes on.
            task = asyncio.current_task()
            if task is None or not hasattr(task, "cancelling") or task.cancelling():
                raise

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise LimitError(413, f"the body has {declared} bytes, more than this server reads ({limit})",
                             code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        while True:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise LimitError(408, f"the body did not arrive within {self.limits.body_timeout_s:g} s "
                                      f"({size} bytes came)", code="timeout") from None
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise LimitError(413, f"the body has more than {limit} bytes, the most this server reads",
                                 code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Gone(Exception):
    """The client went away while sending its body: nobody is left to answer."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def parsed_body(scope: Scope) -> Any:
    return scope.get(BODY_KEY)
