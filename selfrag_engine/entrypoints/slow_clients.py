"""Bounds on slow and idle connections, on uvicorn's HTTP/1.1 protocols.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`), but not the time a client takes to send a
request's headers: a socket that sends nothing, or half the headers, stays open. The protocols here close a
connection whose request line and headers are not complete `header_timeout_s` after it opened or after its
previous response, and answer a connection beyond `connection_limit` open at once with a 503 in OpenAI's error
shape (uvicorn's own `limit_concurrency` answers in plain text) before closing it. The body's own deadline is
`BodyGuard`'s.

The server runs on uvicorn's httptools protocol when httptools is installed (its parser is C: at 64 clients on
the CPU the server answers ~7% more Self-RAG queries per second than on h11's pure-Python one, which shares the
interpreter with the engine loop), and on h11 otherwise; both carry the same bounds.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from selfrag_engine.entrypoints.openai_errors import error_body
from selfrag_engine.entrypoints.server_limits import ServerLimits

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # imports httptools
except ImportError:  # h11 alone
    HttpToolsProtocol = None


def busy_response(limit: int) -> bytes:
    body = json.dumps(error_body(503, f"the server has {limit} connections open, the most it keeps; retry later",
                                 code="too_many_connections")).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class HeaderDeadline:
    """The header deadline and the connection bound, over either uvicorn protocol (which says, through
    `_awaiting_headers`, whether a request's headers are still due)."""
    header_timeout_s: float = 15.0
    connection_limit: int | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.connection_limit is not None and len(self.connections) > self.connection_limit:
            transport.write(busy_response(self.connection_limit))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers():
            self._arm()  # a request begun (or the next one on a kept-alive connection): its headers are due
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the keep-alive timer bounds the idle time; data then re-arms this one

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()


class HeaderTimeoutH11Protocol(HeaderDeadline, H11Protocol):
    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE


if HttpToolsProtocol is not None:
    class HeaderTimeoutHttpToolsProtocol(HeaderDeadline, HttpToolsProtocol):
        _headers_due = True  # from the connection's start, and from each request's first byte to its headers' end

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_due = True

        def on_headers_complete(self) -> None:
            self._headers_due = False
            super().on_headers_complete()

        def _awaiting_headers(self) -> bool:
            return self._headers_due


def protocol_class(header_timeout_s: float, connection_limit: int | None, parser: str = "auto") -> type:
    """The bounded protocol on parser "httptools", "h11", or "auto" (httptools when installed)."""
    if parser == "auto":
        parser = "h11" if HttpToolsProtocol is None else "httptools"
    if parser == "httptools" and HttpToolsProtocol is None:
        raise ImportError("parser 'httptools' needs the httptools package (pip install httptools)")
    base = HeaderTimeoutHttpToolsProtocol if parser == "httptools" else HeaderTimeoutH11Protocol
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s, "connection_limit": connection_limit})


def uvicorn_options(limits: ServerLimits) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keyword arguments for the limits on connections. One HTTP/1.1 connection
    runs one request at a time, so bounding connections bounds requests (uvicorn's limit_concurrency)."""
    return {"http": protocol_class(limits.header_timeout_s, limits.limit_concurrency),
            "timeout_keep_alive": limits.keep_alive_s}
