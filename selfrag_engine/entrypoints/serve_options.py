"""The options of `selfrag-engine serve` beyond the model: each request's bounds and the connections'
timeouts (`server_limits.ServerLimits`), the API key, TLS, hosts and origins (`access.Access`). Registered
without importing the server's dependencies (FastAPI, uvicorn), which only `serve` needs."""
from __future__ import annotations

import argparse

from selfrag_engine.entrypoints.server_limits import ServerLimits

API_KEY_ENV = "SELFRAG_API_KEY"


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    add_limit_options(parser)
    add_access_options(parser)


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    d = ServerLimits()
    g = parser.add_argument_group("limits (each request's work, slow clients)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (413 beyond)")
    g.add_argument("--timeout-body", type=float, default=d.body_timeout_s, help="seconds to read a body (408)")
    g.add_argument("--timeout-header", type=float, default=d.header_timeout_s,
                   help="seconds for a connection to send a request's headers")
    g.add_argument("--timeout-keep-alive", type=int, default=d.keep_alive_s, help="idle keep-alive seconds")
    g.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help="open connections and requests before 503")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts in one completion request")
    g.add_argument("--max-prompt-chars", type=int, default=None,
                   help="characters of a text prompt, message, question or passage (default: the context x the "
                        "longest token)")
    g.add_argument("--max-messages", type=int, default=d.max_messages, help="messages in one chat request")
    g.add_argument("--max-passages", type=int, default=d.max_passages, help="passages in one Self-RAG request")
    g.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings (and stop token ids)")
    g.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters of a stop string")
    g.add_argument("--max-request-rows", type=int, default=None,
                   help="sequences one request may run at once (default: a quarter of --max-pending)")


def add_access_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("access")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--allowed-hosts", nargs="+", default=None,
                   help="Host header values served (default: the bind address and localhost; '*' for any)")
    g.add_argument("--allowed-origins", nargs="+", default=None, help="origins allowed by CORS (default: none)")
    g.add_argument("--enable-docs", action="store_true", help="serve the interactive docs at /docs and /redoc")
