"""Prompts made ready for the engine on a worker thread: text encoded, ids checked, the context checked.

The engine loop would otherwise encode a text prompt itself, between two steps, and every other user's
decoding would wait for it; the server's event loop would stop answering as well. Here the work runs in a
thread of the server's pool, and the loop is handed token ids. A prompt and max_tokens that together exceed
the model's context are refused with 400 as vLLM's server does (the engine alone would cut the generation at
the context).
"""
from __future__ import annotations

from typing import Any, Sequence

from starlette.concurrency import run_in_threadpool

from selfrag_engine.entrypoints.openai_errors import FieldError
from selfrag_engine.errors import RequestError


def encode_prompts(tokenizer: Any, vocab_size: int, max_model_len: int, prompts: Sequence[str | Sequence[int]],
                   max_tokens: int | None, what: str = "prompt") -> list[list[int]]:
    """Token ids of each prompt (text with BOS, as the Python API encodes it), each checked against the
    vocabulary and, with max_tokens, the context."""
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        where = what if len(prompts) == 1 else f"{what}.{i}"
        if isinstance(prompt, str):
            try:
                ids = tokenizer.encode(prompt, add_bos=True)
            except RequestError as e:  # text that is not Unicode (a lone surrogate)
                raise FieldError(what, f"{where}: {e}") from None
            if len(ids) <= 1:
                raise FieldError(what, f"{where}: the prompt is empty")
        else:
            ids = list(prompt)
            if not ids:
                raise FieldError(what, f"{where}: the prompt is empty")
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise FieldError(what, f"{where}: token id {bad} is outside the vocabulary (size {vocab_size})")
        if len(ids) >= max_model_len:
            raise FieldError(what, f"{where}: {len(ids)} tokens leave no room to generate within the model's "
                                   f"context of {max_model_len} tokens", code="context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > max_model_len:
            raise FieldError("max_tokens", f"This model's maximum context length is {max_model_len} tokens. "
                                           f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in "
                                           f"the {what}, {max_tokens} in the completion). Please reduce the "
                                           f"length of the {what} or completion.", code="context_length_exceeded")
        out.append(ids)
    return out


async def prepare_prompts(engine: Any, prompts: Sequence[str | Sequence[int]], max_tokens: int | None,
                          what: str = "prompt") -> list[list[int]]:
    """encode_prompts on a worker thread, for the engine's tokenizer and context."""
    return await run_in_threadpool(encode_prompts, engine.tokenizer, engine.config.vocab_size,
                                   engine.max_model_len, prompts, max_tokens, what)
