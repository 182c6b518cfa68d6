"""What every endpoint shares (vLLM's `OpenAIServing`): the served model's name, submitting a request's rows to
the engine loop, waiting for them while watching for the client to hang up, and the usage object."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from selfrag_engine.engine.loop import EngineLoop, RequestHandle
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.entrypoints.openai.metrics import ServerMetrics
from selfrag_engine.entrypoints.openai.protocol import ChatBody, CompletionBody
from selfrag_engine.entrypoints.openai_errors import FieldError


class OpenAIServing:
    """An endpoint's view of the server: the loop it submits to, the served model's name, the metrics."""

    def __init__(self, loop: EngineLoop, model_name: str, metrics: ServerMetrics):
        self.loop = loop
        self.engine = loop.engine
        self.tokenizer = self.engine.tokenizer
        self.model_name = model_name
        self.metrics = metrics

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise FieldError("model", f"model '{name}' is not served here (this server serves "
                                      f"'{self.model_name}')", code="model_not_found")


def check_stream_options(body: CompletionBody | ChatBody) -> None:
    if body.stream_options is not None and not body.stream:
        raise FieldError("stream_options", "stream_options: only allowed when stream is true",
                         code="stream_options_without_stream")


def sampling_params(body: CompletionBody | ChatBody, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(body.top_k, 0), seed=body.seed, stop=stop,
        stop_token_ids=list(getattr(body, "stop_token_ids", None) or []),
        ignore_eos=bool(getattr(body, "ignore_eos", False)), logprobs=logprobs or None,  # 0: the chosen token only
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=bool(getattr(body, "include_stop_str_in_output", False)))


def submit(loop: EngineLoop, prompts: list, params: SamplingParams, n: int,
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


async def admitted(handles: list[RequestHandle]) -> list[RequestHandle]:
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


async def unless_gone(request: Request, future: asyncio.Future, cancel) -> Any:
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


async def gather(request: Request, handles: list[RequestHandle]):
    """Every handle's output, in order; a client that hangs up cancels them all."""
    def cancel() -> None:
        for h in handles:
            h.cancel()

    try:
        joined = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(h.future) for h in handles)))
        return list(await unless_gone(request, joined, cancel))
    except BaseException:
        cancel()
        raise


def usage(outs, num_prompts: int, n: int) -> dict[str, int]:
    # The n choices of a prompt are adjacent and share it: each prompt counts once.
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n]) if outs else 0
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
