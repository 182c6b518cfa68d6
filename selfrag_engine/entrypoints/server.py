"""An OpenAI-compatible HTTP server over one shared engine loop, and Self-RAG as an endpoint.

    selfrag-engine serve --model DIR [--index DIR] [--host 127.0.0.1] [--port 8000]

`build_app(loop, ...)` returns the ASGI app (FastAPI), to mount in another app or to run with any ASGI server.
The server lives in `selfrag_engine.entrypoints.openai` (protocol, serving modules, app); this module is its
stable import path.
"""
from __future__ import annotations

from selfrag_engine.entrypoints.openai.app import build_app, serve
from selfrag_engine.entrypoints.openai.protocol import (
    ChatBody,
    CompletionBody,
    Message,
    SelfRAGOptions,
    StreamOptions,
)
from selfrag_engine.entrypoints.openai.serving_chat import chat_prompt as _chat_prompt

__all__ = ["build_app", "serve", "ChatBody", "CompletionBody", "Message", "SelfRAGOptions", "StreamOptions",
           "_chat_prompt"]
