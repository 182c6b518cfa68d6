"""`POST /v1/selfrag`: a Self-RAG answer with its branches and scores, or (`stream: true`) the long form's
segments as server-sent events as they settle, then the answer. Chat completions with `selfrag: {...}` answer
through here too."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from selfrag_engine.engine.loop import EngineLoop
from selfrag_engine.entrypoints.finite import require_finite
from selfrag_engine.entrypoints.openai.metrics import ServerMetrics
from selfrag_engine.entrypoints.openai.protocol import SelfRAGOptions
from selfrag_engine.entrypoints.openai.serving_engine import unless_gone
from selfrag_engine.entrypoints.openai_errors import FieldError, error_response
from selfrag_engine.errors import RequestError
from selfrag_engine.selfrag.long_form import Segment
from selfrag_engine.selfrag.options import QueryOptions, answer_record, answer_trace, passages_from, segment_record

_SCORE_INPUTS = ("w_rel", "w_sup", "w_use")


def selfrag_program(retriever: Any, question: str, opts: SelfRAGOptions,
                    on_segment: Callable[[Segment], None] | None = None) -> Callable[[Any], dict[str, Any]]:
    """The program a Self-RAG request runs on the engine loop; its result is the response body (the answer's
    record, its trace and usage). Long-form segments go to on_segment as they settle."""
    if not question.strip():
        raise RequestError("question: the question is empty")
    if opts.compat == "released" and opts.threshold is None:
        # The reference scripts read an undefined variable without one (short form, or a long-form segment
        # with [No Retrieval] inside): refused up front, whatever the model would generate.
        raise FieldError("threshold", "threshold: compat 'released' needs a threshold (the reference scripts fail "
                                      "without one)")
    if opts.passages is not None and not opts.passages:
        raise FieldError("passages", "passages: the list is empty; give passages, or leave the field out")
    passages = passages_from(opts.passages)
    if passages is None and retriever is None and opts.mode != "never":
        raise FieldError("passages", "passages: give passages, or start the server with --index, or use mode "
                                     "'never'", code="passages_required")
    options = QueryOptions.from_mapping(opts.model_dump(), max_new_tokens="max_tokens")

    def program(engine):
        ans = options.runner(engine, retriever).answer(question, passages, **(
            {} if options.form == "short" else {"on_segment": on_segment}))
        return require_finite({**answer_record(ans), "trace": answer_trace(ans),
                               "usage": {"completion_tokens": ans.num_generated_tokens}}, _SCORE_INPUTS)

    return program


def _segment_body(s: Segment) -> dict[str, Any]:
    return require_finite(segment_record(s), _SCORE_INPUTS)


class ServingSelfRAG:
    """Self-RAG queries as programs on the engine loop, searching `retriever` (None: passages come with the
    request)."""

    def __init__(self, loop: EngineLoop, retriever: Any, metrics: ServerMetrics):
        self.loop = loop
        self.retriever = retriever
        self.metrics = metrics

    async def create_answer(self, body: SelfRAGOptions, request: Request):
        start = time.perf_counter()
        if not body.question or not body.question.strip():
            raise RequestError("question: a non-empty question is required")
        if body.stream:
            return self.stream(body.question, body, start)
        result = await self.answer(request, body.question, body)
        self.metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
        return result

    async def answer(self, request: Request, question: str, opts: SelfRAGOptions) -> dict[str, Any]:
        handle = self.loop.run_program(selfrag_program(self.retriever, question, opts), timeout_s=opts.timeout)
        try:
            return await unless_gone(request, asyncio.wrap_future(handle), handle.cancel)
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def stream(self, question: str, opts: SelfRAGOptions, start: float) -> StreamingResponse:
        """Server-sent events: a `selfrag.segment` event for each long-form segment as soon as no later choice
        can drop it, then `selfrag.answer` (the body /v1/selfrag returns), then [DONE]. A short-form answer has
        no segments. A client that goes away cancels the query, which frees its blocks."""
        events = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics

        def on_segment(segment: Segment) -> None:  # on the program's worker thread
            events.call_soon_threadsafe(queue.put_nowait, _segment_body(segment))

        # A bad body is a 400 before any event.
        program = selfrag_program(self.retriever, question, opts, on_segment)
        handle = self.loop.run_program(program, timeout_s=opts.timeout)
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
                    yield f"data: {json.dumps(json.loads(error_response(e).body))}\n\n"
                else:
                    metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
                    yield f"data: {json.dumps({'object': 'selfrag.answer', **result}, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()

        return StreamingResponse(gen(), media_type="text/event-stream")
