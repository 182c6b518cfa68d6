"""`/openapi.json` as the server behaves: what FastAPI generates from the request models, corrected where the
server answers otherwise.

- Errors are 400 (never FastAPI's 422) with OpenAI's error object; 401 where a key is required, 408, 413 and
  429 where the server answers them; `/metrics` is Prometheus text, not JSON; a streamed response is
  `text/event-stream`.
- The bodies carry the bounds the server checks: the served model's name, the limits of `server_limits`,
  token ids within the vocabulary, the context for `max_tokens`, the passage's `text`, a question with
  something in it, the counts that fit one request's share of the admission rows.
- Rules across fields that a JSON schema cannot state in a usable form are listed in each body's
  `x-cross-field-rules`: the 400 the server answers for each carries the `code` named there.
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from selfrag_engine.entrypoints.openai.protocol import NULL_IS_DEFAULT
from selfrag_engine.entrypoints.openai.request_params import ENGINE_FIELDS, NEUTRAL
from selfrag_engine.entrypoints.openai_errors import ERROR_SCHEMA
from selfrag_engine.entrypoints.server_limits import BodyChecks

# The largest integer the server parses (`ServerLimits.max_int_digits` digits).
_INT_CAP = 10 ** 40 - 1
TOP_K_MAX = 2 ** 31 - 1
# "Says something": a character Python's str.strip() keeps (the server's test). ECMA's \S alone would admit
# the separators \x1c-\x1f and \x85, which Python counts as whitespace.
HAS_TEXT = r"[^\s\x1c-\x1f\x85]"

CROSS_FIELD_RULES = {
    "context_length_exceeded": "the prompt's tokens plus max_tokens fit the model's context (the messages' "
                               "characters, together, fit it too)",
    "too_many_rows": "n x prompts (or ndocs x beam_width) fit one request's share of the server's row slots",
    "passages_required": "/v1/selfrag needs passages unless the server has an index or mode is 'never'",
    "non_finite": "the Self-RAG scores the weights make stay finite",
    "unsupported": "a Self-RAG chat answer does not stream (stream from /v1/selfrag) and takes its options in "
                   "`selfrag` only (another sampling field at a value of its own is refused)",
    "stream_options_without_stream": "stream_options only with stream: true",
    "invalid_token_id": "logit_bias's keys are token ids of the served model (below its vocabulary size)",
    "invalid_grammar": "response_format's json_schema.schema, guided_json, guided_regex and guided_grammar compile "
                       "(a JSON schema, a regular expression, an EBNF grammar); guided_choice is a non-empty list "
                       "of non-empty strings",
    "structured_conflict": "one output constraint per request: response_format (json_object or json_schema) or "
                           "one guided_* field",
    "best_of_below_n": "best_of, when given, is at least n",
    "best_of_with_stream": "best_of above n does not stream",
    "echo_with_stream": "echo does not stream",
    "prompt_logprobs_with_stream": "prompt_logprobs does not stream",
    "message_after_last_user": "the last user message is the last message (the instruction the model answers)",
    "top_logprobs_without_logprobs": "top_logprobs above 0 only with logprobs: true",
    "unsupported_engine": "a field this server's engine lacks is only accepted at its neutral value (echo with "
                          "logprobs needs the engine's prompt log-probabilities)",
}


def install_openapi(app: FastAPI, checks: BodyChecks, model_name: str, vocab_size: int, api_key: bool,
                    has_index: bool) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            truthful(schema, checks, model_name, vocab_size, api_key, has_index)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": copy.deepcopy(ERROR_SCHEMA)}}}


def truthful(schema: dict[str, Any], checks: BodyChecks, model_name: str, vocab_size: int, api_key: bool,
             has_index: bool) -> None:
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if method == "post":
                responses["400"] = _error_response("the body is invalid or beyond a limit; `param` names the field")
                responses["408"] = _error_response("the body did not arrive in time, or the request passed its "
                                                   "`timeout`")
                responses["413"] = _error_response("the body is larger than the server reads")
                responses["429"] = _error_response("the server's row slots are taken; retry after Retry-After")
                ok = responses.get("200", {}).setdefault("content", {})
                # With "stream": true: server-sent events, each a `data:` line of JSON (the last is [DONE]).
                ok["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                      "properties": {"data": {"type": "string"}}}}
            if "{model_id}" in path:
                responses["404"] = _error_response("no such model: this server serves one (`code` model_not_found)")
            responses["503"] = _error_response("more connections are open than the server keeps; retry later")
            if api_key and path != "/health":
                responses["401"] = _error_response("no API key, or not this server's")
                op["security"] = [{"bearer": []}]
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    metrics = schema["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}

    ctx = checks.max_model_len
    chars, rows, limits = checks.max_prompt_chars, checks.max_request_rows, checks.limits
    text = {"type": "string", "minLength": 1, "maxLength": chars}
    token_ids = {"type": "array", "minItems": 1, "maxItems": ctx - 1,
                 "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    max_tokens = {"type": "integer", "minimum": 1, "maximum": max(1, ctx - 2)}
    stop = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars},
                      {"type": "array", "maxItems": limits.max_stop,
                       "items": {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars}},
                      {"type": "null"}]}
    model = {"anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}]}
    n = {"type": "integer", "minimum": 1, "maximum": min(64, rows), "default": 1}

    def props(name: str) -> dict[str, Any]:
        return comps[name]["properties"]

    def nullable(p: dict[str, Any]) -> None:
        """A field whose null asks for its default admits null."""
        for name in NULL_IS_DEFAULT & set(p):
            prop = p[name]
            if "anyOf" not in prop or {"type": "null"} not in prop["anyOf"]:
                inner = {k: v for k, v in prop.items() if k not in ("default", "title", "description")}
                p[name] = {"anyOf": [inner, {"type": "null"}],
                           **{k: prop[k] for k in ("default", "title", "description") if k in prop}}

    def cross(name: str, *codes: str) -> None:
        comps[name]["x-cross-field-rules"] = {c: CROSS_FIELD_RULES[c] for c in codes}

    def cap_integers(node: Any) -> None:
        """An integer with no bound gets the parser's, so the schema admits no number the server refuses."""
        if isinstance(node, dict):
            if node.get("type") == "integer":
                node.setdefault("maximum", _INT_CAP)
                node.setdefault("minimum", -_INT_CAP)
            for v in node.values():
                cap_integers(v)
        elif isinstance(node, list):
            for v in node:
                cap_integers(v)

    def sampling(p: dict[str, Any]) -> None:
        """The fields completions and chat share."""
        p["stop_token_ids"] = {"anyOf": [{"type": "array", "maxItems": limits.max_stop, "items": {
            "type": "integer", "minimum": 0, "maximum": vocab_size - 1}}, {"type": "null"}]}
        for name, neutral in NEUTRAL.items():
            if name not in ENGINE_FIELDS:
                p[name] = {"type": "number", "enum": [neutral], "default": neutral}
        p["logit_bias"] = {"anyOf": [{"type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                      "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                                     {"type": "null"}]}
        for name in ("prompt_logprobs", "best_of"):
            if name not in ENGINE_FIELDS:
                p[name] = {"type": "null"}
        if "structured" not in ENGINE_FIELDS:
            for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
                p[name] = {"type": "null"}

    rules = ("invalid_token_id", "invalid_grammar", "structured_conflict", "best_of_below_n", "best_of_with_stream",
             "prompt_logprobs_with_stream", "unsupported_engine")
    if "Message" in comps and "TextPart" not in comps:
        comps["TextPart"] = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                             "properties": {"type": {"const": "text"}, "text": {"type": "string", "maxLength": chars}}}
    if "ResponseFormat" in comps:
        # json_schema only with type json_schema (a schema beside another type is refused, not ignored).
        comps["ResponseFormat"]["allOf"] = [
            {"if": {"properties": {"type": {"const": "json_schema"}}},
             "else": {"properties": {"json_schema": {"type": "null"}}}}]
    if "CompletionBody" in comps:
        p = props("CompletionBody")
        sampling(p)
        p["suffix"] = {"type": "null"}
        p["model"] = model
        p["prompt"] = {"anyOf": [text, token_ids,
                                 {"type": "array", "minItems": 1, "maxItems": limits.max_prompts, "items": text},
                                 {"type": "array", "minItems": 1, "maxItems": limits.max_prompts,
                                  "items": token_ids}]}
        p["max_tokens"] = {"anyOf": [max_tokens, {"type": "null"}], "default": 16}
        p["stop"] = stop
        p["n"] = n
        p["top_k"] = {"type": "integer", "minimum": -1, "maximum": TOP_K_MAX, "default": -1}
        nullable(p)
        cross("CompletionBody", "context_length_exceeded", "too_many_rows", "stream_options_without_stream",
              "echo_with_stream", *rules)
    if "Message" in comps:
        p = props("Message")
        p["content"] = {"anyOf": [{"type": "string", "maxLength": chars},
                                  {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}},
                                  {"type": "null"}]}
        for name in ("name", "tool_calls", "tool_call_id", "function_call"):
            p[name] = {"type": "null"}
        said = {"anyOf": [{"type": "string", "pattern": HAS_TEXT},
                          {"type": "array", "contains": {"type": "object", "properties": {
                              "text": {"type": "string", "pattern": HAS_TEXT}}}}]}
        # A user message says something (the last one is the instruction); only an assistant's may be null.
        comps["Message"]["allOf"] = [
            {"if": {"required": ["role"], "properties": {"role": {"const": "user"}}},
             "then": {"required": ["content"], "properties": {"content": said}}},
            {"if": {"required": ["role"], "properties": {"role": {"enum": ["system", "tool", "developer"]}}},
             "then": {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}}}]
    if "ChatBody" in comps:
        p = props("ChatBody")
        sampling(p)
        for name in ("tools", "functions", "function_call", "parallel_tool_calls"):
            p[name] = {"type": "null"}
        p["tool_choice"] = {"enum": [None, "none"]}
        p["model"] = model
        p["messages"] = {"type": "array", "minItems": 1, "maxItems": limits.max_messages,
                         "items": {"$ref": "#/components/schemas/Message"},
                         "contains": {"type": "object", "required": ["role"],
                                      "properties": {"role": {"const": "user"}}}}
        p["max_tokens"] = {"anyOf": [max_tokens, {"type": "null"}]}
        p["max_completion_tokens"] = {"anyOf": [max_tokens, {"type": "null"}]}
        p["stop"] = stop
        p["n"] = n
        p["top_k"] = {"type": "integer", "minimum": -1, "maximum": TOP_K_MAX, "default": -1}
        nullable(p)
        cross("ChatBody", "context_length_exceeded", "too_many_rows", "non_finite", "unsupported",
              "stream_options_without_stream", "message_after_last_user", "top_logprobs_without_logprobs", *rules)
    if "SelfRAGOptions" in comps:
        p = props("SelfRAGOptions")
        p["question"] = {"anyOf": [{**text, "pattern": HAS_TEXT}, {"type": "null"}]}
        p["passages"] = {"anyOf": [{"type": "array", "minItems": 1, "maxItems": limits.max_passages, "items": {
            "type": "object", "required": ["text"], "additionalProperties": {"type": "string", "maxLength": chars},
            "properties": {"title": {"type": "string", "maxLength": chars},
                           "text": {"type": "string", "maxLength": chars}}}}, {"type": "null"}]}
        p["ndocs"] = {"type": "integer", "minimum": 1, "maximum": min(64, rows), "default": 5}
        p["max_tokens"] = {"anyOf": [max_tokens, {"type": "null"}],
                           "description": "null: the form's own (100 tokens short, 300 long)"}
        # compat 'released' expands depths 1..max_depth-1 of the long form: it needs max_depth >= 2, and a
        # mode other than 'never' (the reference long-form script fails there). compat 'released' needs a
        # threshold.
        comps["SelfRAGOptions"]["allOf"] = [
            # beam_width and max_depth are the long form's: null in the short form (the default form).
            {"if": {"required": ["form"], "properties": {"form": {"const": "long"}}},
             "else": {"properties": {"beam_width": {"type": "null"}, "max_depth": {"type": "null"}}}},
            {"if": {"required": ["compat", "form"], "properties": {"compat": {"const": "released"},
                                                                  "form": {"const": "long"}}},
             "then": {"properties": {"max_depth": {"anyOf": [{"type": "integer", "minimum": 2}, {"type": "null"}]},
                                     "mode": {"not": {"const": "never"}}}}},
            {"if": {"required": ["compat"], "properties": {"compat": {"const": "released"}}},
             "then": {"properties": {"threshold": {"type": "number"}}}}]
        cross("SelfRAGOptions", "context_length_exceeded", "too_many_rows", "non_finite",
              *(() if has_index else ("passages_required",)))
    selfrag_op = schema["paths"].get("/v1/selfrag", {}).get("post")
    if selfrag_op is not None:
        body = selfrag_op["requestBody"]["content"]["application/json"]
        body["schema"] = {"allOf": [{"$ref": "#/components/schemas/SelfRAGOptions"},
                                    {"type": "object", "required": ["question"],
                                     "properties": {"question": {**text, "pattern": HAS_TEXT}}}]}
    cap_integers(comps)
