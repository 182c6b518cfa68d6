"""`POST /v1/completions` (vLLM's `OpenAIServingCompletion`): one or more prompts, n choices each."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request

from selfrag_engine.engine.output import Delta
from selfrag_engine.entrypoints.openai.logprobs import completion_logprobs
from selfrag_engine.entrypoints.openai.protocol import CompletionBody
from selfrag_engine.entrypoints.openai.serving_engine import (
    OpenAIServing,
    admitted,
    check_stream_options,
    gather,
    sampling_params,
    submit,
    usage,
)
from selfrag_engine.entrypoints.openai.streaming import stream_response
from selfrag_engine.entrypoints.prompt_prep import prepare_prompts
from selfrag_engine.errors import RequestError


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt: an empty list is not a prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


class OpenAIServingCompletion(OpenAIServing):

    async def create_completion(self, body: CompletionBody, request: Request):
        start = time.perf_counter()
        self.check_model(body.model)
        check_stream_options(body)
        if body.echo:
            raise RequestError("echo is not supported")
        tok = self.tokenizer
        prompts = await prepare_prompts(self.engine, prompt_list(body.prompt), body.max_tokens)
        params = sampling_params(body, body.max_tokens, body.logprobs)
        handles = await admitted(submit(self.loop, prompts, params, body.n, body.timeout))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            def chunk(i: int, d: Delta, first: bool, offset: int) -> dict[str, Any]:
                lp = completion_logprobs(tok, d, offset) if body.logprobs is not None else None
                return {"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason}

            return stream_response(handles, self.metrics, start, "completions", body.stream_options, chunk,
                                   {"id": rid, "object": "text_completion", "created": created,
                                    "model": self.model_name},
                                   wants_logprobs=body.logprobs is not None, n=body.n)
        outs = await gather(request, handles)
        choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                    "logprobs": completion_logprobs(tok, o) if body.logprobs is not None else None}
                   for i, o in enumerate(outs)]
        self.metrics.latency.labels("completions").observe(time.perf_counter() - start)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage(outs, len(prompts), body.n)}
