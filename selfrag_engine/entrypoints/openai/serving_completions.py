"""`POST /v1/completions` (vLLM's `OpenAIServingCompletion`): one or more prompts, n choices each; `echo`
puts the prompt before each choice's text (with `logprobs`, its tokens first in `logprobs`, the first one's
log-probability null, as vLLM answers)."""
from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from selfrag_engine.engine.output import Delta
from selfrag_engine.entrypoints.openai.logprobs import (
    StreamedTokens,
    clip_to,
    completion_logprobs,
    prompt_logprobs_body,
    token_texts,
)
from selfrag_engine.entrypoints.openai.protocol import CompletionBody
from selfrag_engine.entrypoints.openai.request_params import sampling_params
from selfrag_engine.entrypoints.openai.serving_engine import (
    OpenAIServing,
    admitted,
    check_common,
    response_choices,
    gather,
    submit,
    usage,
)
from selfrag_engine.entrypoints.openai.streaming import stream_response
from selfrag_engine.entrypoints.openai_errors import FieldError
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
        check_common(body)
        if body.suffix is not None:
            raise FieldError("suffix", "suffix: this model does not fill in the middle; leave suffix out",
                             code="unsupported")
        if body.echo and body.stream:
            raise FieldError("echo", "echo: not with stream (ask without stream to have the prompt echoed)",
                             code="echo_with_stream")
        tok = self.tokenizer
        texts = prompt_list(body.prompt)
        prompts = await prepare_prompts(self.engine, texts, body.max_tokens)
        # echo with logprobs k: the prompt tokens' log-probabilities (and top k) come from the engine.
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        prompt_lp = body.prompt_logprobs if body.prompt_logprobs is not None else echo_lp
        if echo_lp is not None and body.prompt_logprobs is not None:
            prompt_lp = max(echo_lp, body.prompt_logprobs)
        # max_tokens null: each prompt generates up to the rest of its context, as vLLM's completions do.
        rest = [self.engine.max_model_len - len(p) for p in prompts]
        # Off the event loop: a grammar (response_format, guided_*) is compiled when its params are made.
        params = await run_in_threadpool(sampling_params, body, body.max_tokens or rest[0], body.logprobs,
                                         self.engine.config.vocab_size, prompt_lp)
        per_prompt = [params if body.max_tokens else replace(params, max_tokens=r) for r in rest]
        handles = await admitted(submit(self.loop, prompts, per_prompt, body.n, body.timeout))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        skip = body.skip_special_tokens
        if body.stream:
            streamed: dict[int, StreamedTokens] = {}

            def chunk(i: int, d: Delta, first: bool) -> dict[str, Any]:
                lp = None
                if body.logprobs is not None:
                    tokens = streamed.setdefault(i, StreamedTokens(tok, prompts[i // body.n], skip))
                    at = tokens.covered  # where its released tokens begin (the text sent may run ahead)
                    ids, pieces, lps, tops = tokens.release(d.token_ids, d.token_logprobs, d.logprobs, d.text,
                                                            d.finished)
                    lp = completion_logprobs(tok, ids, pieces, lps, tops, at)
                return {"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason}

            return stream_response(handles, self.metrics, start, "completions", body.stream_options, chunk,
                                   {"id": rid, "object": "text_completion", "created": created,
                                    "model": self.model_name},
                                   wants_logprobs=body.logprobs is not None, n=body.n)
        outs = response_choices(await gather(request, handles), params)
        choices = []
        for i, o in enumerate(outs):
            prompt_ids = prompts[i // body.n]
            text = o.text
            prompt_text = ""
            if body.echo:
                given = texts[i // body.n]
                prompt_text = given if isinstance(given, str) else tok.decode(prompt_ids, skip_special_tokens=skip)
            choice: dict[str, Any] = {"index": i, "text": prompt_text + text, "finish_reason": o.finish_reason,
                                      "stop_reason": o.stop_reason, "logprobs": None}
            if body.logprobs is not None:
                pieces = clip_to(token_texts(tok, prompt_ids, o.token_ids, skip), text)
                ids, lps, tops = list(o.token_ids), list(o.token_logprobs), o.logprobs
                if body.echo:
                    pieces, ids, lps, tops = self._echoed(prompt_ids, prompt_text, o, pieces, tops, skip)
                choice["logprobs"] = completion_logprobs(tok, ids, pieces, lps, tops)
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_body(tok, o.prompt_logprobs)
            choices.append(choice)
        self.metrics.latency.labels("completions").observe(time.perf_counter() - start)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage(outs, len(prompts), body.n)}

    def _echoed(self, prompt_ids: list[int], prompt_text: str, out, pieces: list[str], tops, skip: bool):
        """The prompt's tokens before the output's in the logprobs (vLLM's echo): their strings join to the
        echoed prompt text, the first token's log-probability is null."""
        tok = self.tokenizer
        entries = out.prompt_logprobs
        if entries is None or len(entries) != len(prompt_ids):
            raise RuntimeError("the engine returned no prompt log-probabilities for an echo with logprobs")
        first = tok.decode(prompt_ids[:1], skip_special_tokens=skip)
        prompt_pieces = clip_to([first] + token_texts(tok, prompt_ids[:1], prompt_ids[1:], skip), prompt_text)
        prompt_lps = [None] + [e.get(t) if e is not None else None for t, e in zip(prompt_ids[1:], entries[1:])]
        # logprobs 0 asks for no candidates: top_logprobs stays null, as for an output without echo.
        all_tops = None if tops is None else [None] + list(entries[1:]) + list(tops)
        return (prompt_pieces + pieces, list(prompt_ids) + list(out.token_ids),
                prompt_lps + list(out.token_logprobs), all_tops)
