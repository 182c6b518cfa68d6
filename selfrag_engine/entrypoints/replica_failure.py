"""What a client sees when the engine replica serving its request dies (Ray Serve's HTTP proxy, on its own,
answers a bare "500 Internal Server Error" or cuts the connection mid-stream).

`ReplicaFailure` is an ASGI middleware around Ray Serve's proxy, installed through Ray's proxy callback
(`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=selfrag_engine.entrypoints.replica_failure:proxy_middlewares`,
set in the environment of the Ray nodes; `selfrag-engine serve --replicas` sets it for the local cluster it
starts). The replicas' own app answers every request, errors included, with a complete response, so a
response that never starts or never ends means the replica went away:

- nothing was sent yet and the request is not streamed (its body says no `"stream": true`): it is sent once
  more, to a live replica (Ray's router no longer picks the dead one); nothing could have reached the client,
  and a request is independent of any other, so this is safe;
- otherwise, nothing sent yet: HTTP 503 in OpenAI's error shape, with Retry-After;
- a server-sent-event stream that breaks: a last `data: {"error": {...}}` event (code 503), then the end of
  the stream, so no client waits on a stream nobody will finish.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.middleware import Middleware

from selfrag_engine.entrypoints.openai_errors import error_body

CALLBACK = "selfrag_engine.entrypoints.replica_failure:proxy_middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
# Bodies up to this size are kept for a retry; a larger one goes through unbuffered and is not retried.
MAX_RETRY_BODY = 8 << 20
RETRY_AFTER_S = 1


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback: the middlewares it wraps its HTTP app in."""
    return [Middleware(ReplicaFailure)]


def _streamed(body: bytes) -> bool:
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        return False  # the replica answers it with a 400 at once
    return isinstance(parsed, dict) and parsed.get("stream") is True


def _message(what: str) -> str:
    return (f"the engine replica serving this request {what}; Ray is replacing it, and other replicas serve "
            "new requests: retry")


class ReplicaFailure:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more and size <= MAX_RETRY_BODY:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                await self.app(scope, _replay([], message, receive, []), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        retry = not more and not _streamed(b"".join(chunks))
        gone: list[bool] = []
        for attempt in (0, 1):
            state = {"started": False, "ended": False, "sse": False}

            async def tracked(message: dict) -> None:
                if message["type"] == "http.response.start":
                    state["started"] = True
                    headers = dict(message.get("headers") or [])
                    state["sse"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    state["ended"] = True
                await send(message)

            try:
                await self.app(scope, _replay(chunks, None if more else {}, receive, gone), tracked)
            except Exception:  # noqa: BLE001 - the proxy's own failure: answered below like a dead replica
                pass
            if state["ended"] or gone:  # answered, or the client left (the proxy cancelled it)
                return
            if not state["started"]:
                if retry and attempt == 0:
                    continue
                body = json.dumps(error_body(503, _message("stopped before answering"),
                                             code="replica_unavailable")).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"retry-after", str(RETRY_AFTER_S).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            tail = b""
            if state["sse"]:
                event = error_body(503, _message("stopped in the middle of this stream"), code="replica_unavailable")
                tail = f"data: {json.dumps(event)}\n\n".encode()
            try:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            except Exception:  # noqa: BLE001 - the client is gone too
                pass
            return


def _replay(chunks: list[bytes], last: dict | None, receive: Any, gone: list[bool]) -> Any:
    """A `receive` that hands the buffered body again, then defers to the client's connection (whose next
    message is the rest of the body, or the disconnect)."""
    queue = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    if queue and last is not None:
        queue[-1]["more_body"] = False
    elif last and last.get("type") == "http.disconnect":
        queue.append(last)

    async def replayed() -> dict:
        if queue:
            return queue.pop(0)
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
        return message

    return replayed
