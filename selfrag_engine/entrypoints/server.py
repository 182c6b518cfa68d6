"""An OpenAI-compatible HTTP server over one shared engine loop, and Self-RAG as an endpoint.

    selfrag-engine serve --model DIR [--index DIR] [--host 127.0.0.1] [--port 8000]

`build_app(loop, ...)` returns the ASGI app (FastAPI), to mount in another app or to run with any ASGI server.

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` as OpenAI's (and vLLM's) API: max_tokens,
  temperature, top_p, seed, stop, n, logprobs / top_logprobs, stream (server-sent events), usage. Defaults are
  vLLM's: max_tokens 16 for completions (the rest of the context for chat), temperature 1, special tokens
  skipped. A text prompt is encoded as the Python API encodes it (BOS, then the text). The chat template is
  Self-RAG's instruction format: the last user message is the instruction, earlier messages go before it.
- `POST /v1/selfrag`: a Self-RAG answer with its branches and scores (`stream: true`: the long form's segments
  as server-sent events as they settle, then the answer); the same through chat completions with an extra
  body field `selfrag: {...}` (the last user message is the question).
- `GET /health`, `GET /metrics` (Prometheus text).
Bad bodies get HTTP 400 with an OpenAI-style error object naming the field (`openai_errors`); each request's
work is bounded before it reaches the engine (`server_limits`, `body_guard`, `prompt_prep`), admission is
counted in rows with a per-request share (`admission`: 429 with a Retry-After from the queue), and the API
key, hosts and origins are `access`'s.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.loop import EngineLoop, RequestHandle
from selfrag_engine.engine.output import Delta, RequestOutput
from selfrag_engine.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from selfrag_engine.entrypoints.access import Access, install_access
from selfrag_engine.entrypoints.admission import Admission, AdmissionGate
from selfrag_engine.entrypoints.body_guard import BodyGuard
from selfrag_engine.entrypoints.finite import require_finite
from selfrag_engine.entrypoints.openai_errors import FieldError, install_error_handlers
from selfrag_engine.entrypoints.openai_errors import error_response as _error_response
from selfrag_engine.entrypoints.openapi_schema import install_openapi
from selfrag_engine.entrypoints.prompt_prep import prepare_prompts
from selfrag_engine.entrypoints.server_limits import BodyChecks, ModelBounds, ServerLimits, longest_token_chars
from selfrag_engine.entrypoints.slow_clients import uvicorn_options
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.batched import BatchedSearch, SearchStats
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.evaluate import long_form_trace, short_form_trace
from selfrag_engine.selfrag.long_form import LongFormSelfRAG, Segment
from selfrag_engine.selfrag.prompts import format_prompt
from selfrag_engine.selfrag.scoring import ScoringConfig
from selfrag_engine.selfrag.short_form import SelfRAG

# -- request bodies -------------------------------------------------------------------------------------------

class _Body(BaseModel):
    # Fields OpenAI defines that this server does not use (user, frequency_penalty at 0, ...) are accepted.
    # Strict: `true` is not a count, "5" not a number, 2.0 not an integer, as /openapi.json says.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: the usage so far on every chunk


class CompletionBody(_Body):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=64)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    timeout: float | None = Field(None, gt=0)


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class SelfRAGOptions(_Body):
    question: str | None = None
    passages: list[dict[str, str]] | None = None
    form: Literal["short", "long"] = "short"
    mode: Literal["adaptive", "always", "never"] = "adaptive"
    ndocs: int = Field(5, ge=1, le=64)
    compat: Literal["paper", "released"] = "paper"
    threshold: float | None = 0.2
    w_rel: float | None = None
    w_sup: float | None = None
    w_use: float | None = None
    use_seqscore: bool | None = None
    max_tokens: int = Field(100, ge=1)
    beam_width: int | None = Field(None, ge=1)
    max_depth: int | None = Field(None, ge=1)
    stream: bool = False
    timeout: float | None = Field(None, gt=0)


class ChatBody(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    timeout: float | None = Field(None, gt=0)
    selfrag: SelfRAGOptions | None = None


# -- the app ----------------------------------------------------------------------------------------------

class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("selfrag_requests_in_flight", "requests and queries admitted, not finished",
                                 registry=r)
        self.running_rows = Gauge("selfrag_running_rows", "sequences the scheduler runs", registry=r)
        self.kv_used = Gauge("selfrag_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("selfrag_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_capacity = Gauge("selfrag_kv_cache_capacity_tokens", "tokens the KV pool holds, by its dtype",
                                 ["dtype"], registry=r)
        self.kv_bytes = Gauge("selfrag_kv_cache_bytes", "bytes of the KV pool (keys, values, scales)", registry=r)
        self.tokens = Counter("selfrag_generated_tokens", "tokens generated for requests (rate() gives tokens/s)",
                              registry=r)
        self.tokens_seen = 0
        self.requests = Counter("selfrag_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("selfrag_time_to_first_token_seconds", "time to the first streamed token",
                              registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("selfrag_request_latency_seconds", "end-to-end latency by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.searches = Counter("selfrag_searches", "retriever searches (queries)", registry=r)
        self.search_batches = Counter("selfrag_search_batches", "batches the searches went in", registry=r)
        self.search_seen = (0, 0)

    def count_searches(self, stats: SearchStats) -> None:
        queries, batches = stats.queries, stats.batches
        self.searches.inc(queries - self.search_seen[0])
        self.search_batches.inc(batches - self.search_seen[1])
        self.search_seen = (queries, batches)


def build_app(loop: EngineLoop, model_name: str, retriever: Any = None, limits: ServerLimits | None = None,
              access: Access | None = None) -> FastAPI:
    """The server's ASGI app over `loop` (which it does not close). Concurrent users' searches of `retriever`
    go in batches (`BatchedSearch`). `limits` bound each request's work (`server_limits`); `access` sets the
    API key, hosts and origins (`access`; default: none, any host)."""
    limits = limits or ServerLimits()
    access = access or Access()
    docs = {} if access.enable_docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="selfrag-engine", version="0.1.0", **docs)
    metrics = _Metrics()
    if retriever is not None and not isinstance(retriever, BatchedSearch):
        retriever = BatchedSearch(retriever)
    app.state.retriever = retriever
    engine = loop.engine
    tok = engine.tokenizer
    app.state.loop = loop
    app.state.metrics = metrics

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        stats = await _on_loop(loop, _engine_stats, engine)
        metrics.queue_depth.set(loop.pending)
        metrics.running_rows.set(stats["running"])
        metrics.kv_used.set(stats["used"])
        metrics.kv_free.set(stats["free"])
        metrics.kv_capacity.labels(stats["kv_dtype"]).set(stats["kv_capacity_tokens"])
        metrics.kv_bytes.set(stats["kv_cache_bytes"])
        # Tokens of every request the loop streamed or answered, cancelled ones included up to their cut.
        seen = loop.stats.generated_tokens
        metrics.tokens.inc(seen - metrics.tokens_seen)
        metrics.tokens_seen = seen
        if retriever is not None:
            metrics.count_searches(retriever.stats)
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "selfrag-engine",
                                            "max_model_len": engine.max_model_len}]}

    def _check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise FieldError("model", f"model '{name}' is not served here (this server serves '{model_name}')",
                             code="model_not_found")

    def _check_stream_options(body: CompletionBody | ChatBody) -> None:
        if body.stream_options is not None and not body.stream:
            raise FieldError("stream_options", "stream_options: only allowed when stream is true",
                             code="stream_options_without_stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        start = time.perf_counter()
        _check_model(body.model)
        _check_stream_options(body)
        if body.echo:
            raise RequestError("echo is not supported")
        prompts = await prepare_prompts(engine, _prompts(body.prompt), body.max_tokens)
        params = _params(body, body.max_tokens, body.logprobs)
        handles = await _admitted(_submit(loop, prompts, params, body.n, body.timeout))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            def chunk(i: int, d: Delta, first: bool, offset: int) -> dict[str, Any]:
                lp = _completion_logprobs(tok, d, offset) if body.logprobs is not None else None
                return {"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason}

            return _stream(handles, metrics, start, "completions", body.stream_options, chunk,
                           {"id": rid, "object": "text_completion", "created": created, "model": model_name},
                           wants_logprobs=body.logprobs is not None, n=body.n)
        outs = await _gather(request, handles)
        choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                    "logprobs": _completion_logprobs(tok, o) if body.logprobs is not None else None}
                   for i, o in enumerate(outs)]
        metrics.latency.labels("completions").observe(time.perf_counter() - start)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": _usage(outs, len(prompts), body.n)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        start = time.perf_counter()
        _check_model(body.model)
        _check_stream_options(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.selfrag is not None:
            if body.stream:
                raise FieldError("stream", "stream: Self-RAG answers stream from /v1/selfrag (long-form segments), "
                                           "not from chat completions", code="unsupported")
            opts = body.selfrag
            question = opts.question or _last_user(body.messages)
            result = await _selfrag(request, loop, retriever, question, opts)
            metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": result["usage"], "selfrag": result}
        prompt = _chat_prompt(body.messages)
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        max_tokens = body.max_completion_tokens or body.max_tokens
        [prompt_ids] = await prepare_prompts(engine, [prompt], max_tokens, what="messages")
        if max_tokens is None:
            max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        params = _params(body, max_tokens, top)
        handles = await _admitted(_submit(loop, [prompt_ids], params, body.n, body.timeout))
        if body.stream:
            def chunk(i: int, d: Delta, first: bool, offset: int) -> dict[str, Any]:
                delta = {"role": "assistant", "content": d.text} if first else {"content": d.text}
                lp = _chat_logprobs(tok, d, top) if body.logprobs else None
                return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}

            return _stream(handles, metrics, start, "chat", body.stream_options, chunk,
                           {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name},
                           wants_logprobs=bool(body.logprobs), n=body.n)
        outs = await _gather(request, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                    "logprobs": _chat_logprobs(tok, o, top) if body.logprobs else None,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason} for i, o in enumerate(outs)]
        metrics.latency.labels("chat").observe(time.perf_counter() - start)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": _usage(outs, 1, body.n)}

    @app.post("/v1/selfrag")
    async def selfrag(body: SelfRAGOptions, request: Request):
        start = time.perf_counter()
        if not body.question or not body.question.strip():
            raise RequestError("question: a non-empty question is required")
        if body.stream:
            return _selfrag_stream(loop, retriever, body.question, body, metrics, start)
        result = await _selfrag(request, loop, retriever, body.question, body)
        metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
        return result

    # Outermost last: the request counter, then CORS, host and key checks, the body's bounds, admission.
    admission = Admission(loop.max_pending)
    app.state.admission = admission
    bounds = ModelBounds(engine.max_model_len, longest_token_chars(tok))
    app.add_middleware(AdmissionGate, admission=admission)
    checks = BodyChecks.resolve(limits, bounds, admission.capacity)
    app.add_middleware(BodyGuard, checks=checks)
    install_openapi(app, checks, model_name, engine.config.vocab_size, bool(access.api_key), retriever is not None)
    install_access(app, access)
    app.add_middleware(_CountRequests, counter=metrics.requests)
    app.state.count_tokens = metrics.tokens
    return app


# -- helpers ------------------------------------------------------------------------------------------------

class _CountRequests:
    """Counts responses by path and status. A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide
    a client's disconnect from the endpoints, which cancel their work on it."""

    def __init__(self, app, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # The route's template, never the raw path: a client's random paths must not grow the metrics.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.counter.labels(route, str(status["code"])).inc()


async def _on_loop(loop: EngineLoop, fn, *args):
    return await asyncio.wrap_future(loop.call(fn, *args))


def _engine_stats(engine) -> dict[str, int | str]:
    stats = engine.cache_stats()
    return {"used": stats["used"], "free": stats["free"], "running": engine.num_running(),
            "kv_capacity_tokens": stats["kv_capacity_tokens"], "kv_cache_bytes": stats["kv_cache_bytes"],
            "kv_dtype": str(engine.kv_cache_dtype).removeprefix("torch.")}


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt: an empty list is not a prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _params(body: CompletionBody | ChatBody, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(body.top_k, 0), seed=body.seed, stop=stop,
        stop_token_ids=list(getattr(body, "stop_token_ids", None) or []),
        ignore_eos=bool(getattr(body, "ignore_eos", False)), logprobs=logprobs or None,  # 0: the chosen token only
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=bool(getattr(body, "include_stop_str_in_output", False)))


def _submit(loop: EngineLoop, prompts: list, params: SamplingParams, n: int,
            timeout: float | None) -> list[RequestHandle]:
    """n choices per prompt (choice i of a seeded request draws with seed + i, so choices differ)."""
    handles: list[RequestHandle] = []
    try:
        for prompt in prompts:
            for i in range(n):
                p = params
                if params.seed is not None and i > 0:
                    p = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                handles.append(loop.submit(prompt, p, timeout_s=timeout))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def _admitted(handles: list[RequestHandle]) -> list[RequestHandle]:
    """Waits until the engine took every request (or refused one: a bad prompt is a 400, before any stream)."""
    try:
        await asyncio.gather(*(asyncio.wrap_future(h.accepted) for h in handles))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up: the server's next ASGI message after a read body is the disconnect
    (or comes when the response is complete, by which time nobody waits on this)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, future: asyncio.Future, cancel) -> Any:
    """Awaits `future`, calling `cancel()` (which frees the work's blocks) if the client hangs up first."""
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({future, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if future in done:
        return future.result()
    cancel()
    future.cancel()
    raise asyncio.CancelledError("the client went away")


async def _gather(request: Request, handles: list[RequestHandle]):
    def cancel() -> None:
        for h in handles:
            h.cancel()

    try:
        joined = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(h.future) for h in handles)))
        return list(await _unless_gone(request, joined, cancel))
    except BaseException:
        cancel()
        raise


def _stream(handles: list[RequestHandle], metrics: _Metrics, start: float, endpoint: str,
            options: StreamOptions | None, choice: Callable[[int, Delta, bool, int], dict[str, Any]],
            head: dict[str, Any], wants_logprobs: bool, n: int) -> StreamingResponse:
    """Server-sent events: a chunk for every step's delta of every choice, in arrival order, as soon as the
    engine hands it over (its text what that step made final, its tokens' log-probabilities when asked), then,
    with stream_options.include_usage, a chunk with the usage, then [DONE]. A delta with no text and no news is
    not sent, unless it carries log-probabilities. A client that goes away cancels its requests, which frees
    their blocks at the next step (the response's generator is closed and cancels them)."""
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats

    async def gen():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h: RequestHandle) -> None:
            try:
                async for d in h:
                    await queue.put((i, d, None))
            except BaseException as e:  # noqa: BLE001 - reported in the stream
                await queue.put((i, None, e))
            await queue.put((i, None, StopAsyncIteration()))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        open_choices = len(handles)
        sent_first: set[int] = set()
        offsets = [0] * len(handles)  # characters each choice has sent
        completion = [0] * len(handles)
        try:
            while open_choices:
                i, d, err = await queue.get()
                if isinstance(err, StopAsyncIteration):
                    open_choices -= 1
                    continue
                if err is not None:
                    body = json.loads(_error_response(err).body)
                    yield f"data: {json.dumps(body)}\n\n"
                    continue
                completion[i] += len(d.token_ids)
                if not (d.text or d.finished or (wants_logprobs and d.token_ids)):
                    continue
                if i not in sent_first and d.text:
                    metrics.ttft.observe(time.perf_counter() - start)
                event = {**head, "choices": [choice(i, d, i not in sent_first, offsets[i])]}
                sent_first.add(i)
                offsets[i] += len(d.text)
                if continuous:
                    event["usage"] = _stream_usage(handles, n, completion)
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            if include_usage:
                event = {**head, "choices": [], "usage": _stream_usage(handles, n, completion)}
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        finally:
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

    return StreamingResponse(gen(), media_type="text/event-stream")


def _stream_usage(handles: list[RequestHandle], n: int, completion: list[int]) -> dict[str, int]:
    # The n choices of a prompt are adjacent and share it: each prompt counts once.
    prompt_tokens = sum(h.num_prompt_tokens or 0 for h in handles[::n])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
            "total_tokens": prompt_tokens + sum(completion)}


def _usage(outs, num_prompts: int, n: int) -> dict[str, int]:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n]) if outs else 0
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _token_str(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tok, out: RequestOutput | Delta, offset: int = 0) -> dict[str, Any]:
    """OpenAI's completion logprobs of `out`'s tokens; a streamed chunk's offsets continue from `offset`, the
    characters its choice sent before."""
    tokens = [_token_str(tok, t) for t in out.token_ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top = None
    if out.logprobs is not None:
        top = [{_token_str(tok, t): lp for t, lp in step.items()} for step in out.logprobs]
    return {"tokens": tokens, "token_logprobs": list(out.token_logprobs), "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(tok, out: RequestOutput | Delta, top: int | None) -> dict[str, Any]:
    content = []
    for step, (t, lp) in enumerate(zip(out.token_ids, out.token_logprobs)):
        s = _token_str(tok, t)
        entry = {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
        if top and out.logprobs is not None:
            ranked = sorted(out.logprobs[step].items(), key=lambda kv: -kv[1])[:top]
            entry["top_logprobs"] = [{"token": _token_str(tok, i), "logprob": v,
                                      "bytes": list(_token_str(tok, i).encode("utf-8"))} for i, v in ranked]
        content.append(entry)
    return {"content": content}


def _last_user(messages: list[Message]) -> str:
    for m in reversed(messages):
        if m.role == "user":
            return m.content
    raise RequestError("messages: no user message to answer")


def _chat_prompt(messages: list[Message]) -> str:
    """Self-RAG's instruction format: earlier messages, then the last user message, as the instruction."""
    question = _last_user(messages)
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    context = [f"{m.role}: {m.content}" for m in messages[:last]]
    return format_prompt("\n".join(context + [question]) if context else question)


def _scoring(opts: SelfRAGOptions, form: str) -> ScoringConfig:
    knobs = {k: getattr(opts, k) for k in ("w_rel", "w_sup", "w_use", "use_seqscore") if getattr(opts, k) is not None}
    knobs["threshold"] = opts.threshold
    return (ScoringConfig.paper(**knobs) if opts.compat == "paper"
            else ScoringConfig.released(form=form, **knobs))


def _selfrag_program(retriever: Any, question: str, opts: SelfRAGOptions,
                     on_segment: Callable[[Segment], None] | None = None) -> Callable[[Any], dict[str, Any]]:
    """The program a Self-RAG request runs on the engine loop; its result is the response body. Long-form
    segments go to on_segment as they settle."""
    if not question.strip():
        raise RequestError("question: the question is empty")
    if opts.compat == "released" and opts.threshold is None:
        # The reference scripts read an undefined variable without one (short form, or a long-form segment
        # with [No Retrieval] inside): refused up front, whatever the model would generate.
        raise FieldError("threshold", "threshold: compat 'released' needs a threshold (the reference scripts fail "
                                      "without one)")
    passages = None
    if opts.passages is not None:
        if not opts.passages:
            raise FieldError("passages", "passages: the list is empty; give passages, or leave the field out")
        passages = []
        for i, p in enumerate(opts.passages):
            if "text" not in p:
                raise RequestError(f"passages.{i}: a passage needs a 'text' (and may have a 'title')")
            passages.append(Passage(title=p.get("title", ""), text=p["text"], id=p.get("id")))
    if passages is None and retriever is None and opts.mode != "never":
        raise FieldError("passages", "passages: give passages, or start the server with --index, or use mode "
                                     "'never'", code="passages_required")

    def program(engine):
        if opts.form == "short":
            rag = SelfRAG(engine, retriever=retriever, scoring=_scoring(opts, "short"), ndocs=opts.ndocs,
                          max_new_tokens=opts.max_tokens, mode=opts.mode, compat=opts.compat)
            ans = rag.answer(question, passages)
            trace = short_form_trace(ans)
            branches = [{"passage": {"title": b.passage.title, "text": b.passage.text}, "text": b.text,
                         "relevance": b.relevance, "grounding": b.grounding, "utility": b.utility,
                         "final": b.final} for b in ans.branches]
            return require_finite({"answer": ans.answer, "retrieved": ans.retrieved,
                                   "retrieval_probability": ans.retrieval_probability, "branches": branches,
                                   "best": ans.best, "citations": None, "trace": trace,
                                   "usage": {"completion_tokens": ans.num_generated_tokens}}, _SCORE_INPUTS)
        kwargs = {k: getattr(opts, k) for k in ("beam_width", "max_depth") if getattr(opts, k) is not None}
        rag = LongFormSelfRAG(engine, retriever=retriever, scoring=_scoring(opts, "long"), ndocs=opts.ndocs,
                              max_new_tokens=opts.max_tokens, mode=opts.mode, compat=opts.compat, **kwargs)
        ans = rag.answer(question, passages, on_segment=on_segment)
        citations = [None if c is None else {"title": c.title, "text": c.text} for c in ans.citations]
        return require_finite({"answer": ans.answer, "retrieved": ans.retrieved, "retrieval_probability": None,
                               "branches": [], "best": None, "citations": citations, "trace": long_form_trace(ans),
                               "usage": {"completion_tokens": ans.num_generated_tokens}}, _SCORE_INPUTS)

    return program


_SCORE_INPUTS = ("w_rel", "w_sup", "w_use")


def _segment_body(s: Segment) -> dict[str, Any]:
    return require_finite({"text": s.text, "depth": s.depth,
            "passage": None if s.passage is None else {"title": s.passage.title, "text": s.passage.text},
            "relevance": s.relevance, "grounding": s.grounding, "utility": s.utility, "final": s.final,
            "score": s.score}, _SCORE_INPUTS)


def _selfrag_stream(loop: EngineLoop, retriever: Any, question: str, opts: SelfRAGOptions, metrics: _Metrics,
                    start: float) -> StreamingResponse:
    """Server-sent events: a `selfrag.segment` event for each long-form segment as soon as no later choice
    can drop it, then `selfrag.answer` (the body /v1/selfrag returns), then [DONE]. A short-form answer has
    no segments. A client that goes away cancels the query, which frees its blocks."""
    events = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_segment(segment: Segment) -> None:  # on the program's worker thread
        events.call_soon_threadsafe(queue.put_nowait, _segment_body(segment))

    program = _selfrag_program(retriever, question, opts, on_segment)  # a bad body is a 400 before any event
    handle = loop.run_program(program, timeout_s=opts.timeout)
    # Queued after every segment the program handed over, since those were queued before it returned.
    handle.add_done_callback(lambda _: events.call_soon_threadsafe(queue.put_nowait, None))

    async def gen():
        try:
            index = 0
            while (segment := await queue.get()) is not None:
                event = {"object": "selfrag.segment", "index": index, "segment": segment}
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                index += 1
            try:
                result = handle.result()
            except Exception as e:  # noqa: BLE001 - reported in the stream
                yield f"data: {json.dumps(json.loads(_error_response(e).body))}\n\n"
            else:
                metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
                yield f"data: {json.dumps({'object': 'selfrag.answer', **result}, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    return StreamingResponse(gen(), media_type="text/event-stream")


async def _selfrag(request: Request, loop: EngineLoop, retriever: Any, question: str,
                   opts: SelfRAGOptions) -> dict[str, Any]:
    handle = loop.run_program(_selfrag_program(retriever, question, opts), timeout_s=opts.timeout)
    try:
        return await _unless_gone(request, asyncio.wrap_future(handle), handle.cancel)
    except asyncio.CancelledError:
        handle.cancel()
        raise


def serve(args) -> int:
    """`selfrag-engine serve`: loads the model, starts the loop and runs uvicorn until interrupted."""
    retriever = None
    if args.index is not None:
        # faiss is the `retrieval` extra.
        from selfrag_engine.retrieval.retriever import Retriever

        retriever = BatchedSearch(Retriever.load(args.index))
    name = args.served_model_name or Path(args.model).resolve().name
    limits, access = ServerLimits.from_args(args), Access.from_args(args)
    with EngineLoop(lambda: _load_engine(args), max_pending=args.max_pending) as loop:
        app = build_app(loop, name, retriever, limits, access)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, **uvicorn_options(limits))
    if retriever is not None:
        retriever.close()
    return 0


def _load_engine(args) -> Engine:
    """The served engine, built on the engine loop's thread (EngineLoop's factory), so that the loop's OpenMP
    team is the process's only one (see engine/loop.py)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Engine.from_pretrained(args.model, device=device, dtype=args.dtype, quantization=args.quantization,
                                  progress=not args.quiet, kv_cache_dtype=args.kv_cache_dtype,
                                  **({"num_blocks": args.num_blocks} if args.num_blocks else {}))
