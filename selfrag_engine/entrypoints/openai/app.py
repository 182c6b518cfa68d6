"""The server's ASGI app: routes, the guards around them, and `serve` (the `selfrag-engine serve` command).

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` as OpenAI's (and vLLM's) API.
- `POST /v1/selfrag`: a Self-RAG answer with its branches and scores (`serving_selfrag`).
- `GET /health`, `GET /metrics` (Prometheus text).

The routes only hand the parsed body to the endpoint's serving object (`serving_*`), kept on `app.state` as
vLLM keeps them. Middleware, outermost first: the request counter, `access` (CORS, hosts, API key),
`body_guard` (the body's bounds), `admission` (row slots).
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.loop import EngineLoop
from selfrag_engine.entrypoints.access import Access, install_access
from selfrag_engine.entrypoints.admission import Admission, AdmissionGate
from selfrag_engine.entrypoints.body_guard import BodyGuard
from selfrag_engine.entrypoints.openai.metrics import CountRequests, ServerMetrics, engine_stats
from selfrag_engine.entrypoints.openai.protocol import ChatBody, CompletionBody, SelfRAGOptions
from selfrag_engine.entrypoints.openai.serving_chat import OpenAIServingChat
from selfrag_engine.entrypoints.openai.serving_completions import OpenAIServingCompletion
from selfrag_engine.entrypoints.openai.serving_selfrag import ServingSelfRAG
from selfrag_engine.entrypoints.openai_errors import error, install_error_handlers
from selfrag_engine.entrypoints.openapi_schema import install_openapi
from selfrag_engine.entrypoints.server_limits import BodyChecks, ModelBounds, ServerLimits, longest_token_chars
from selfrag_engine.entrypoints.slow_clients import uvicorn_options
from selfrag_engine.retrieval.batched import BatchedSearch

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics_text(request: Request) -> PlainTextResponse:
    state = request.app.state
    loop: EngineLoop = state.loop
    stats = await asyncio.wrap_future(loop.call(engine_stats, loop.engine))
    state.metrics.update(stats, loop.pending, loop.stats.generated_tokens)
    if state.retriever is not None:
        state.metrics.count_searches(state.retriever.stats)
    return PlainTextResponse(generate_latest(state.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)


def _card(state) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "selfrag-engine",
            "max_model_len": state.loop.engine.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(request.app.state)]}


@router.get("/v1/models/{model_id:path}")
async def model_card(model_id: str, request: Request):
    state = request.app.state
    if model_id != state.model_name:
        return error(404, f"The model '{model_id}' does not exist (this server serves '{state.model_name}')",
                     "model", kind="invalid_request_error", code="model_not_found")
    return _card(state)


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    return await request.app.state.serving_completion.create_completion(body, request)


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: Request):
    return await request.app.state.serving_chat.create_chat_completion(body, request)


@router.post("/v1/selfrag")
async def selfrag(body: SelfRAGOptions, request: Request):
    return await request.app.state.serving_selfrag.create_answer(body, request)


def build_app(loop: EngineLoop, model_name: str, retriever: Any = None, limits: ServerLimits | None = None,
              access: Access | None = None) -> FastAPI:
    """The server's ASGI app over `loop` (which it does not close). Concurrent users' searches of `retriever`
    go in batches (`BatchedSearch`). `limits` bound each request's work (`server_limits`); `access` sets the
    API key, hosts and origins (`access`; default: none, any host)."""
    limits = limits or ServerLimits()
    access = access or Access()
    docs = {} if access.enable_docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="selfrag-engine", version="0.1.0", **docs)
    if retriever is not None and not isinstance(retriever, BatchedSearch):
        retriever = BatchedSearch(retriever)
    engine = loop.engine
    metrics = ServerMetrics()
    state = app.state
    state.loop, state.model_name, state.retriever, state.metrics = loop, model_name, retriever, metrics
    state.created = int(time.time())
    state.serving_selfrag = ServingSelfRAG(loop, retriever, metrics)
    state.serving_completion = OpenAIServingCompletion(loop, model_name, metrics)
    state.serving_chat = OpenAIServingChat(loop, model_name, metrics, selfrag=state.serving_selfrag)
    install_error_handlers(app)
    app.include_router(router)

    # Outermost last: the request counter, then CORS, host and key checks, the body's bounds, admission.
    admission = Admission(loop.max_pending)
    state.admission = admission
    bounds = ModelBounds(engine.max_model_len, longest_token_chars(engine.tokenizer))
    app.add_middleware(AdmissionGate, admission=admission)
    checks = BodyChecks.resolve(limits, bounds, admission.capacity)
    app.add_middleware(BodyGuard, checks=checks)
    install_openapi(app, checks, model_name, engine.config.vocab_size, bool(access.api_key), retriever is not None)
    install_access(app, access)
    app.add_middleware(CountRequests, counter=metrics.requests)
    state.count_tokens = metrics.tokens
    return app


def serve(args) -> int:
    """`selfrag-engine serve`: loads the model, starts the loop and runs uvicorn until interrupted."""
    retriever = None
    if args.index is not None:
        # faiss is the `retrieval` extra.
        from selfrag_engine.retrieval.retriever import Retriever

        retriever = BatchedSearch(Retriever.load(args.index))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine.from_pretrained(args.model, device=device, dtype=args.dtype,
                                    quantization=args.quantization, progress=not args.quiet,
                                    kv_cache_dtype=args.kv_cache_dtype,
                                    **({"num_blocks": args.num_blocks} if args.num_blocks else {}))
    name = args.served_model_name or Path(args.model).resolve().name
    limits, access = ServerLimits.from_args(args), Access.from_args(args)
    with EngineLoop(engine, max_pending=args.max_pending) as loop:
        app = build_app(loop, name, retriever, limits, access)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, **uvicorn_options(limits))
    if retriever is not None:
        retriever.close()
    return 0
