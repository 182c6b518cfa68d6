"""Who may use the server: an API key, the Host names it answers to, and the origins browsers may call it from.

- `--api-key KEY` (or `SELFRAG_API_KEY`): every route but `/health` needs `Authorization: Bearer KEY`
  (compared in constant time); 401 in OpenAI's shape otherwise.
- `--allowed-hosts`: the Host header must name one of them (Starlette's `TrustedHostMiddleware` matching;
  `*.example.com` wildcards, `*` for any). Default: the bind address and localhost (for a wildcard bind
  0.0.0.0 or ::, the machine's name and addresses too), so a page that rebinds its DNS name to 127.0.0.1
  cannot use a local server. 400 otherwise.
- `--allowed-origins`: origins a browser may call the API from (CORS); none by default.
"""
from __future__ import annotations

import argparse
import hmac
import os
import socket
from dataclasses import dataclass

from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from selfrag_engine.entrypoints.openai_errors import error
from selfrag_engine.entrypoints.serve_options import API_KEY_ENV

OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class Access:
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ("*",)
    allowed_origins: tuple[str, ...] = ()
    enable_docs: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Access":
        key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
        hosts = tuple(args.allowed_hosts) if args.allowed_hosts else default_hosts(args.host)
        return cls(api_key=key, allowed_hosts=hosts, allowed_origins=tuple(args.allowed_origins or ()),
                   enable_docs=args.enable_docs)


def default_hosts(bind: str) -> tuple[str, ...]:
    hosts = {"localhost", "127.0.0.1", "::1", bind.strip("[]").lower()}
    if bind in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
        hosts |= {name.lower(), socket.getfqdn(name).lower()}
        try:
            hosts |= {info[4][0].lower() for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
        hosts -= {"0.0.0.0", "::", ""}
    return tuple(sorted(hosts))


class HostCheck:
    """Refuses a request whose Host header is not allowed, with a 400 in OpenAI's shape; the matching is
    Starlette's TrustedHostMiddleware's."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]):
        self.app = app
        self.matcher = TrustedHostMiddleware(_mark_allowed, allowed_hosts=list(allowed_hosts), www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def swallow(message) -> None:
            pass

        await self.matcher(scope, receive, swallow)
        if not scope.pop(_ALLOWED, False):
            return await error(400, "the Host header names a host this server does not answer to (see "
                                    "--allowed-hosts)", code="invalid_host")(scope, receive, send)
        await self.app(scope, receive, send)


_ALLOWED = "selfrag.host_allowed"


async def _mark_allowed(scope: Scope, receive: Receive, send: Send) -> None:
    scope[_ALLOWED] = True


class ApiKeyCheck:
    """Requires `Authorization: Bearer <key>` on every route but the open ones."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):
            what = "no API key was given" if not given else "the API key is not valid"
            return await error(401, f"{what}: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


def install_access(app, access: Access) -> None:
    """Adds the checks to a Starlette/FastAPI app; they run before every other middleware added earlier
    (CORS first, so that a browser's preflight is answered, then the host, then the key)."""
    if access.api_key:
        app.add_middleware(ApiKeyCheck, api_key=access.api_key)
    if "*" not in access.allowed_hosts:
        app.add_middleware(HostCheck, allowed_hosts=access.allowed_hosts)
    if access.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(access.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
