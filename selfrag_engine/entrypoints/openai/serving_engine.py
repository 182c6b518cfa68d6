"""What every endpoint shares (vLLM's `OpenAIServing`): the served model's name, submitting a request's rows to
the engine loop, waiting for them while watching for the client to hang up, and the usage object."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
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


def check_common(body: CompletionBody | ChatBody) -> None:
    """The rules across fields both endpoints share."""
    if body.stream_options is not None and not body.stream:
        raise FieldError("stream_options", "stream_options: only allowed when stream is true",
                         code="stream_options_without_stream")
    if body.best_of is not None and body.best_of < body.n:
        raise FieldError("best_of", f"best_of must be >= n, got best_of={body.best_of} and n={body.n}",
                         code="best_of_below_n")
    if body.prompt_logprobs is not None and body.stream:  # as vLLM refuses it: a stream has no place for them
        raise FieldError("prompt_logprobs", "prompt_logprobs: not with stream (ask without stream to have the "
                                            "prompt's log-probabilities)", code="prompt_logprobs_with_stream")
    if body.best_of is not None and body.best_of > body.n and body.stream:
        raise FieldError("best_of", "best_of: not with stream (the best choices are known at the end)",
                         code="best_of_with_stream")


def submit(loop: EngineLoop, prompts: list, params: list[SamplingParams], n: int,
           timeout: float | None) -> list[RequestHandle]:
    """n choices of each prompt under its params (choice i of a seeded request draws with seed + i, so choices
    differ), or, for best_of above n, one request per prompt whose engine samples best_of and keeps the n best."""
    handles: list[RequestHandle] = []
    try:
        for prompt, own in zip(prompts, params, strict=True):
            for i in range(1 if engine_ranks(own) else n):
                p = own
                if own.seed is not None and i > 0:
                    p = replace(own, seed=own.seed + i)
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


def engine_ranks(params: SamplingParams) -> bool:
    """Whether the engine samples best_of sequences and keeps the n best (else each choice is a request)."""
    return (getattr(params, "best_of", None) or 1) > 1


@dataclass
class Choice:
    """One choice of a response: a request's output, or one of the n samples a best_of request kept."""
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_logprobs: list | None


def response_choices(outs: list, params: SamplingParams) -> list[Choice]:
    """The response's choices, prompt by prompt."""
    out: list[Choice] = []
    for o in outs:
        samples = o.outputs if engine_ranks(params) else [o]
        out += [Choice(list(o.prompt_token_ids), c.text, list(c.token_ids), list(c.token_logprobs), c.logprobs,
                       c.finish_reason, c.stop_reason, getattr(o, "prompt_logprobs", None)) for c in samples]
    return out


def usage(outs, num_prompts: int, n: int) -> dict[str, int]:
    # The n choices of a prompt are adjacent and share it: each prompt counts once.
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[::n]) if outs else 0
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
