"""Server-sent events for streamed completions and chat completions."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from fastapi.responses import StreamingResponse

from selfrag_engine.engine.loop import RequestHandle
from selfrag_engine.engine.output import Delta
from selfrag_engine.entrypoints.openai.metrics import ServerMetrics
from selfrag_engine.entrypoints.openai.protocol import StreamOptions
from selfrag_engine.entrypoints.openai_errors import error_response


def stream_response(handles: list[RequestHandle], metrics: ServerMetrics, start: float, endpoint: str,
                    options: StreamOptions | None, choice: Callable[[int, Delta, bool], dict[str, Any]],
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
        completion = [0] * len(handles)
        try:
            while open_choices:
                i, d, err = await queue.get()
                if isinstance(err, StopAsyncIteration):
                    open_choices -= 1
                    continue
                if err is not None:
                    body = json.loads(error_response(err).body)
                    yield f"data: {json.dumps(body)}\n\n"
                    continue
                completion[i] += len(d.token_ids)
                if not (d.text or d.finished or (wants_logprobs and d.token_ids)):
                    continue
                if i not in sent_first and d.text:
                    metrics.ttft.observe(time.perf_counter() - start)
                event = {**head, "choices": [choice(i, d, i not in sent_first)]}
                sent_first.add(i)
                if continuous:
                    event["usage"] = stream_usage(handles, n, completion)
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            if include_usage:
                event = {**head, "choices": [], "usage": stream_usage(handles, n, completion)}
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        finally:
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

    return StreamingResponse(gen(), media_type="text/event-stream")


def stream_usage(handles: list[RequestHandle], n: int, completion: list[int]) -> dict[str, int]:
    # The n choices of a prompt are adjacent and share it: each prompt counts once.
    prompt_tokens = sum(h.num_prompt_tokens or 0 for h in handles[::n])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
            "total_tokens": prompt_tokens + sum(completion)}
