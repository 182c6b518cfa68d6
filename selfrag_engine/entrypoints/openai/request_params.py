"""OpenAI's request fields (and vLLM's extras) to the engine's `SamplingParams`, in one place.

| request field | SamplingParams |
|---|---|
| max_tokens (chat: max_completion_tokens, else the rest of the context) | max_tokens |
| temperature, top_p, seed, stop, stop_token_ids, ignore_eos, skip_special_tokens, include_stop_str_in_output | the same |
| top_k (-1 or 0: off) | top_k (0: off) |
| logprobs (completions: a count 0-20; chat: true, with top_logprobs 0-20) | logprobs (None for 0: the chosen token's log-probability is always returned) |
| presence_penalty, frequency_penalty, repetition_penalty, min_p | the same |
| logit_bias {"token id": bias} | logit_bias {token id: bias} |
| prompt_logprobs; echo with logprobs k (completions) | prompt_logprobs (k) |
| response_format json_object / json_schema, guided_json, guided_regex, guided_choice, guided_grammar | structured (StructuredOutput json_object / json / regex / choice / grammar) |
| n | n requests per prompt (a seeded request's choice i draws with seed + i) |
| best_of > n | best_of |

A field the engine of this build does not have is refused with a 400 naming it when it asks for anything
but its neutral value, never ignored.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.entrypoints.openai.protocol import ChatBody, CompletionBody
from selfrag_engine.entrypoints.openai_errors import FieldError
from selfrag_engine.errors import RequestError

try:  # the structured-output engine and xgrammar are optional
    from selfrag_engine.engine.structured_output import StructuredOutput
except ImportError:  # pragma: no cover - a build without it
    StructuredOutput = None

ENGINE_FIELDS = frozenset(f.name for f in fields(SamplingParams))
# Fields that map one to one, with the value that asks for nothing.
NEUTRAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0}
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
MAX_LOGIT_BIAS = 100.0


def engine_field(name: str, value: Any, neutral: Any = None) -> dict[str, Any]:
    """{name: value} for SamplingParams, {} for the neutral value; a 400 naming the field where the engine
    cannot honour it."""
    if value is None or value == neutral:
        return {}
    if name not in ENGINE_FIELDS:
        raise FieldError(name, f"{name}: this server's engine does not support {name}; leave it out"
                               + ("" if neutral is None else f" or at {neutral!r}"), code="unsupported_engine")
    return {name: value}


def logit_bias_ids(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as strings) as {token id: bias}."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise FieldError("logit_bias", f"logit_bias: {key!r} is not a token id of this model (an integer from "
                                           f"0 to {vocab_size - 1}, written as a string)", code="invalid_token_id")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise FieldError("logit_bias", f"logit_bias: the bias of token {key} is {value}, outside "
                                           f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        out[int(key)] = float(value)
    return out


def structured_output(body: CompletionBody | ChatBody) -> Any:
    """The one output constraint the body asks for (response_format or a guided_* extra), or None."""
    specs: list[tuple[str, dict[str, Any]]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type != "json_schema" and fmt.json_schema is not None:
        raise FieldError("response_format", f"response_format: json_schema goes with type 'json_schema', not "
                                            f"{fmt.type!r}", code="invalid_grammar")
    if fmt is not None and fmt.type == "json_object":
        specs.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, (dict, bool)):
            raise FieldError("response_format", "response_format: type 'json_schema' needs json_schema.schema, a "
                                                "JSON schema", code="invalid_grammar")
        specs.append(("response_format", {"json": {} if schema is True else schema}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        value = getattr(body, name)
        if value is not None:
            specs.append((name, {key: value}))
    if not specs:
        return None
    if len(specs) > 1:
        names = ", ".join(n for n, _ in specs)
        raise FieldError(specs[1][0], f"{specs[1][0]}: one output constraint per request; got {names}",
                         code="structured_conflict")
    name, spec = specs[0]
    if StructuredOutput is None or "structured" not in ENGINE_FIELDS:
        raise FieldError(name, f"{name}: structured output is not supported by this server's engine",
                         code="unsupported_engine")
    try:
        return StructuredOutput(**spec)
    except RequestError as e:
        raise FieldError(name, f"{name}: {e}", code="invalid_grammar") from None


def sampling_params(body: CompletionBody | ChatBody, max_tokens: int, logprobs: int | None, vocab_size: int,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The SamplingParams of one choice of `body` (the table above)."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    extra: dict[str, Any] = {}
    for name, neutral in NEUTRAL.items():
        extra.update(engine_field(name, getattr(body, name), neutral))
    extra.update(engine_field("logit_bias", logit_bias_ids(body.logit_bias, vocab_size)))
    extra.update(engine_field("prompt_logprobs", prompt_logprobs))
    structured = structured_output(body)
    if structured is not None:
        extra["structured"] = structured
    if body.best_of is not None and body.best_of > body.n:
        extra.update(engine_field("best_of", body.best_of))
        extra["n"] = body.n
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(body.top_k, 0), seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos, logprobs=logprobs or None,  # 0: the chosen token only
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, **extra)
