"""`POST /v1/chat/completions` (vLLM's `OpenAIServingChat`): the messages in Self-RAG's instruction format, or,
with an extra body field `selfrag: {...}`, a Self-RAG answer to the last user message."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request

from selfrag_engine.engine.output import Delta
from selfrag_engine.entrypoints.openai.logprobs import chat_logprobs
from selfrag_engine.entrypoints.openai.protocol import ChatBody, Message
from selfrag_engine.entrypoints.openai.serving_engine import (
    OpenAIServing,
    admitted,
    check_stream_options,
    gather,
    sampling_params,
    submit,
    usage,
)
from selfrag_engine.entrypoints.openai.serving_selfrag import ServingSelfRAG
from selfrag_engine.entrypoints.openai.streaming import stream_response
from selfrag_engine.entrypoints.openai_errors import FieldError
from selfrag_engine.entrypoints.prompt_prep import prepare_prompts
from selfrag_engine.errors import RequestError
from selfrag_engine.selfrag.prompts import format_prompt


def last_user(messages: list[Message]) -> str:
    for m in reversed(messages):
        if m.role == "user":
            return m.content
    raise RequestError("messages: no user message to answer")


def chat_prompt(messages: list[Message]) -> str:
    """Self-RAG's instruction format: earlier messages, then the last user message, as the instruction."""
    question = last_user(messages)
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    context = [f"{m.role}: {m.content}" for m in messages[:last]]
    return format_prompt("\n".join(context + [question]) if context else question)


class OpenAIServingChat(OpenAIServing):

    def __init__(self, *args: Any, selfrag: ServingSelfRAG, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.selfrag = selfrag

    async def create_chat_completion(self, body: ChatBody, request: Request):
        start = time.perf_counter()
        self.check_model(body.model)
        check_stream_options(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.selfrag is not None:
            return await self._selfrag_answer(body, request, rid, created, start)
        tok = self.tokenizer
        prompt = chat_prompt(body.messages)
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        max_tokens = body.max_completion_tokens or body.max_tokens
        [prompt_ids] = await prepare_prompts(self.engine, [prompt], max_tokens, what="messages")
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_model_len - len(prompt_ids))
        params = sampling_params(body, max_tokens, top)
        handles = await admitted(submit(self.loop, [prompt_ids], params, body.n, body.timeout))
        if body.stream:
            def chunk(i: int, d: Delta, first: bool, offset: int) -> dict[str, Any]:
                delta = {"role": "assistant", "content": d.text} if first else {"content": d.text}
                lp = chat_logprobs(tok, d, top) if body.logprobs else None
                return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason}

            return stream_response(handles, self.metrics, start, "chat", body.stream_options, chunk,
                                   {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name},
                                   wants_logprobs=bool(body.logprobs), n=body.n)
        outs = await gather(request, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                    "logprobs": chat_logprobs(tok, o, top) if body.logprobs else None,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason} for i, o in enumerate(outs)]
        self.metrics.latency.labels("chat").observe(time.perf_counter() - start)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage(outs, 1, body.n)}

    async def _selfrag_answer(self, body: ChatBody, request: Request, rid: str, created: int,
                              start: float) -> dict[str, Any]:
        if body.stream:
            raise FieldError("stream", "stream: Self-RAG answers stream from /v1/selfrag (long-form segments), "
                                       "not from chat completions", code="unsupported")
        opts = body.selfrag
        question = opts.question or last_user(body.messages)
        result = await self.selfrag.answer(request, question, opts)
        self.metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": result["usage"], "selfrag": result}
