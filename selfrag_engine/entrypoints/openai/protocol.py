"""The request bodies of the OpenAI-compatible endpoints and of `/v1/selfrag`, as pydantic models.

FastAPI validates each body against its model and names the first field at fault (`openai_errors` turns that
into OpenAI's 400); `/openapi.json` is generated from these models (`openapi_schema` corrects it where the
server checks more than a model can say).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selfrag_engine.engine.sampling_params import MAX_TOP_LOGPROBS


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
