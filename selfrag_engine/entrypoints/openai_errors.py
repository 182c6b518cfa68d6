"""Every error the server answers, in OpenAI's shape:

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

`param` names the top-level body field at fault where one is. Messages may quote what the client sent, so they
are made safe for any string (a lone surrogate becomes U+FFFD) and are never a traceback: an unexpected
exception is logged with its traceback on the server and answered 500 with its class name only.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from selfrag_engine.errors import (
    CacheCapacityError,
    Cancelled,
    ContextLengthError,
    DeadlineExceeded,
    QueueFullError,
    RequestError,
    SelfragEngineError,
)

log = logging.getLogger("selfrag_engine.server")

# The JSON schema of the error body, for the OpenAPI document.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
          429: "rate_limit_exceeded", 499: "cancelled", 503: "service_unavailable"}


def safe_text(s: str) -> str:
    """s with every lone surrogate replaced by U+FFFD, so it encodes as UTF-8."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": safe_text(message), "type": kind or _TYPES.get(status, "server_error"),
                      "param": None if param is None else safe_text(param), "code": code}}


def error(status: int, message: str, param: str | None = None, kind: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, kind, code), status_code=status, headers=headers)


def _param_of(message: str) -> str | None:
    """The body field a named error's message starts with ('prompt: ...', 'passages.0: ...', 'top_k must
    ...', 'stop strings ...'), if it names one."""
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
    if match is None:
        return None
    head = match.group(0)
    if head in BODY_FIELDS or (message[match.end():].startswith(":") and "_" in head):
        return head
    return None


# The fields of the request bodies (completions, chat, Self-RAG), which an error message may start with.
BODY_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n",
    "logprobs", "echo", "stream", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "timeout",
    "messages", "max_completion_tokens", "top_logprobs", "selfrag", "question", "passages", "form", "mode",
    "ndocs", "compat", "threshold", "w_rel", "w_sup", "w_use", "use_seqscore", "beam_width", "max_depth",
    "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "best_of",
    "prompt_logprobs", "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "suffix", "tools", "tool_choice", "functions", "function_call", "stream_options", "user"})


def error_response(e: BaseException, retry_after: int = 1) -> JSONResponse:
    """The response for an exception a handler raised (or a stream met)."""
    if isinstance(e, QueueFullError):
        return error(429, str(e), kind="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})
    if isinstance(e, DeadlineExceeded):
        return error(408, str(e), kind="timeout")
    if isinstance(e, Cancelled):
        return error(499, str(e), kind="cancelled")
    if isinstance(e, FieldError):
        return error(400, str(e), e.param, code=e.code)
    if isinstance(e, ContextLengthError):
        return error(400, str(e), _param_of(str(e)), code="context_length_exceeded")
    if isinstance(e, (RequestError, CacheCapacityError, SelfragEngineError)):
        return error(400, str(e), _param_of(str(e)))
    log.error("unexpected error serving a request", exc_info=e)
    return error(500, f"internal error ({type(e).__name__}); the server's log has the details",
                 kind="server_error")


class FieldError(RequestError):
    """A request error that names the field at fault (the OpenAI error's `param`)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _validation_message(first: dict[str, Any], where: str) -> str:
    if first.get("type") == "extra_forbidden":
        return f"{where}: not a field this endpoint reads (refused rather than ignored)"
    value = first.get("input")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value!r} is not a finite number"
    return f"{where}: {first.get('msg', 'invalid value')}"


def install_error_handlers(app: FastAPI) -> None:
    """Answers 400 (not FastAPI's 422) for bodies the request models refuse, and every HTTP error (404, 405,
    an unparsable body) and named error in the OpenAI shape."""

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        # The top-level field: a union's member names or a list index below it say less than the field.
        param = loc[0] if loc and isinstance(loc[0], str) else None
        where = ".".join(str(p) for p in loc) or "body"
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not JSON: {first.get('msg')}", code="invalid_json")
        return error(400, _validation_message(first, where), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}: {message}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(SelfragEngineError)
    async def _named(request: Request, exc: SelfragEngineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
