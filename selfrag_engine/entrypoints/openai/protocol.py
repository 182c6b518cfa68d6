"""The request bodies of the OpenAI-compatible endpoints and of `/v1/selfrag`, as pydantic models.

FastAPI validates each body against its model and names the first field at fault (`openai_errors` turns that
into OpenAI's 400); `/openapi.json` is generated from these models (`openapi_schema` corrects it where the
server checks more than a model can say).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfrag_engine.engine.sampling_defaults import default
from selfrag_engine.engine.sampling_params import MAX_TOP_LOGPROBS


class _Body(BaseModel):
    # A field the server does not read is refused (400 naming it), never ignored. Strict: `true` is not a
    # count, "5" not a number, 2.0 not an integer, as /openapi.json says.
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseFormat(_Body):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON under a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


# Fields that OpenAI's API reference marks nullable (and vLLM's extras, Optional in vLLM's protocol) whose null
# asks for the default, as OpenAI and vLLM answer it (the openai client sends null for an argument given as None).
# A completion's max_tokens keeps its null: the rest of the context, as vLLM reads it.
NULL_IS_DEFAULT = frozenset({"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "n", "stream", "ignore_eos", "skip_special_tokens",
                             "include_stop_str_in_output", "echo", "logprobs"})


class _Sampling(_Body):
    """What completions and chat completions share: OpenAI's sampling fields and vLLM's extras."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if v is not None or k not in NULL_IS_DEFAULT or k not in cls.model_fields}

    model: str | None = None
    temperature: float = Field(default("temperature"), ge=0.0, le=100.0)
    top_p: float = Field(default("top_p"), gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(default("min_p"), ge=0.0, le=1.0)
    presence_penalty: float = Field(default("presence_penalty"), ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default("frequency_penalty"), ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default("repetition_penalty"), gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default("n"), ge=1, le=64)
    best_of: int | None = Field(None, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = default("skip_special_tokens")
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, and read by nothing (as vLLM does)
    timeout: float | None = Field(None, gt=0)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: the usage so far on every chunk


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default("max_tokens"), ge=1)  # null: the rest of each prompt's context
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None  # refused unless null: the model does not fill in the middle


class Message(_Body):
    """A chat message. content: a string, a list of parts (text parts only: a part of another type is refused
    naming it), or null (an assistant turn)."""
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # OpenAI's tool-calling fields: refused unless null (this server calls no tools).
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None


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
    max_tokens: int | None = Field(None, ge=1)  # None: the form's own (100 short, 300 long), as every entry point
    beam_width: int | None = Field(None, ge=1)
    max_depth: int | None = Field(None, ge=1)
    stream: bool = False
    timeout: float | None = Field(None, gt=0)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    selfrag: SelfRAGOptions | None = None
    # OpenAI's tool-calling fields: refused unless null (this server calls no tools).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
