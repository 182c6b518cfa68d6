"""`POST /v1/chat/completions` (vLLM's `OpenAIServingChat`): the messages in Self-RAG's instruction format, or,
with an extra body field `selfrag: {...}`, a Self-RAG answer to the last user message.

A message's content is a string, a list of text parts (joined with newlines, as vLLM joins them) or null (an
assistant turn); a part of another type (an image, audio, a file) is refused naming it: the model reads text.
Tools and function calls are refused: the model has no format for them."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from selfrag_engine.engine.output import Delta
from selfrag_engine.entrypoints.openai.logprobs import (
    StreamedTokens,
    chat_logprobs,
    clip_to,
    prompt_logprobs_body,
    token_texts,
)
from selfrag_engine.entrypoints.openai.protocol import ChatBody, Message
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
from selfrag_engine.entrypoints.openai.serving_selfrag import ServingSelfRAG
from selfrag_engine.entrypoints.openai.streaming import stream_response
from selfrag_engine.entrypoints.openai_errors import FieldError
from selfrag_engine.entrypoints.prompt_prep import prepare_prompts
from selfrag_engine.errors import RequestError
from selfrag_engine.selfrag.prompts import format_prompt

_NO_TOOLS = "this server calls no tools (the model has no tool-calling format)"
# What a chat body with `selfrag` reads besides it; any other field set to a value of its own is refused.
_SELFRAG_CHAT_FIELDS = frozenset({"model", "messages", "selfrag", "stream", "user"})


def message_text(m: Message, i: int) -> str:
    """A message's text: its string, its text parts joined with newlines, or "" for an assistant's null."""
    if isinstance(m.content, str):
        return m.content
    if m.content is None:
        if m.role != "assistant":
            raise FieldError("messages", f"messages.{i}.content: a {m.role} message needs content (null is for an "
                                         "assistant turn)")
        return ""
    texts = []
    for j, part in enumerate(m.content):
        kind = part.get("type")
        if kind != "text":
            raise FieldError("messages", f"messages.{i}.content.{j}: a part of type {kind!r} is not supported: this "
                                         "model reads text parts only", code="unsupported_content")
        extra = sorted(set(part) - {"type", "text"})
        if extra or not isinstance(part.get("text"), str):
            what = f"unknown keys {extra}" if extra else "no string 'text'"
            raise FieldError("messages", f"messages.{i}.content.{j}: a text part has {what}")
        texts.append(part["text"])
    return "\n".join(texts)


def check_messages(messages: list[Message]) -> None:
    """Tool fields and speaker names refused; nothing after the last user message (the format has no place for
    it: it would be dropped)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if users and users[-1] < len(messages) - 1:
        i = users[-1] + 1
        raise FieldError("messages", f"messages.{i}: a {messages[i].role} message after the last user message; this "
                                     "chat format answers the last user message (Self-RAG's instruction), so no "
                                     "message may follow it", code="message_after_last_user")
    for i, m in enumerate(messages):
        for name in ("tool_calls", "tool_call_id", "function_call"):
            if getattr(m, name) is not None:
                raise FieldError("messages", f"messages.{i}.{name}: {_NO_TOOLS}", code="unsupported")
        if m.name is not None:
            raise FieldError("messages", f"messages.{i}.name: this chat format has no speaker names; leave name out",
                             code="unsupported")
        message_text(m, i)


def last_user(messages: list[Message]) -> str:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            return message_text(messages[i], i)
    raise RequestError("messages: no user message to answer")


def chat_prompt(messages: list[Message]) -> str:
    """Self-RAG's instruction format: earlier messages, then the last user message, as the instruction."""
    question = last_user(messages)
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    context = [f"{m.role}: {message_text(m, i)}" for i, m in enumerate(messages[:last])]
    return format_prompt("\n".join(context + [question]) if context else question)


def check_tools(body: ChatBody) -> None:
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise FieldError(name, f"{name}: {_NO_TOOLS}; leave {name} out", code="unsupported")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise FieldError(name, f"{name}: {_NO_TOOLS}; leave {name} out or set it to 'none'", code="unsupported")
    if body.parallel_tool_calls is not None:  # as OpenAI answers it without tools
        raise FieldError("parallel_tool_calls", f"parallel_tool_calls: only with tools, and {_NO_TOOLS}; leave "
                                                "parallel_tool_calls out", code="unsupported")


class OpenAIServingChat(OpenAIServing):

    def __init__(self, *args: Any, selfrag: ServingSelfRAG, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.selfrag = selfrag

    async def create_chat_completion(self, body: ChatBody, request: Request):
        start = time.perf_counter()
        self.check_model(body.model)
        check_common(body)
        check_tools(body)
        check_messages(body.messages)
        if body.top_logprobs and not body.logprobs:
            raise FieldError("top_logprobs", "top_logprobs: only with logprobs true", code="top_logprobs_without_logprobs")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.selfrag is not None:
            return await self._selfrag_answer(body, request, rid, created, start)
        tok = self.tokenizer
        prompt = chat_prompt(body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        [prompt_ids] = await prepare_prompts(self.engine, [prompt], max_tokens, what="messages")
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_model_len - len(prompt_ids))
        # Off the event loop: a grammar (response_format, guided_*) is compiled when its params are made.
        params = await run_in_threadpool(sampling_params, body, max_tokens, top, self.engine.config.vocab_size,
                                         body.prompt_logprobs)
        handles = await admitted(submit(self.loop, [prompt_ids], [params], body.n, body.timeout))
        skip = body.skip_special_tokens
        if body.stream:
            streamed: dict[int, StreamedTokens] = {}

            def chunk(i: int, d: Delta, first: bool) -> dict[str, Any]:
                delta = {"role": "assistant", "content": d.text} if first else {"content": d.text}
                lp = None
                if body.logprobs:
                    tokens = streamed.setdefault(i, StreamedTokens(tok, prompt_ids, skip))
                    ids, pieces, lps, tops = tokens.release(d.token_ids, d.token_logprobs, d.logprobs, d.text,
                                                            d.finished)
                    lp = chat_logprobs(tok, ids, pieces, lps, tops, top)
                return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason}

            return stream_response(handles, self.metrics, start, "chat", body.stream_options, chunk,
                                   {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name},
                                   wants_logprobs=bool(body.logprobs), n=body.n)
        outs = response_choices(await gather(request, handles), params)
        choices = []
        for i, o in enumerate(outs):
            lp = None
            if body.logprobs:
                pieces = clip_to(token_texts(tok, prompt_ids, o.token_ids, skip), o.text)
                lp = chat_logprobs(tok, o.token_ids, pieces, o.token_logprobs, o.logprobs, top)
            choices.append({"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        self.metrics.latency.labels("chat").observe(time.perf_counter() - start)
        response = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": choices, "usage": usage(outs, 1, body.n)}
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_body(tok, outs[0].prompt_logprobs)
        return response

    async def _selfrag_answer(self, body: ChatBody, request: Request, rid: str, created: int,
                              start: float) -> dict[str, Any]:
        for name, value in (("stream", body.stream), ("selfrag.stream", body.selfrag.stream)):
            if value:
                raise FieldError(name, f"{name}: Self-RAG answers stream from /v1/selfrag (long-form segments), "
                                       "not from chat completions", code="unsupported")
        for name in sorted(body.model_fields_set - _SELFRAG_CHAT_FIELDS):
            if getattr(body, name) != ChatBody.model_fields[name].default:
                raise FieldError(name, f"{name}: a Self-RAG answer (selfrag) decodes with its own options; set them "
                                       f"in selfrag, and leave {name} out", code="unsupported")
        opts = body.selfrag
        question = opts.question or last_user(body.messages)
        result = await self.selfrag.answer(request, question, opts)
        self.metrics.latency.labels("selfrag").observe(time.perf_counter() - start)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": result["usage"], "selfrag": result}
