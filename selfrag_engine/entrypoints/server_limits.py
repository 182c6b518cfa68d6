"""The server's bounds on one request's work, checked on the parsed JSON before a request model, a token list
or an engine request is built, and the server's socket timeouts. Every bound is a `serve` option.

| bound | default | option | refused with |
|---|---|---|---|
| request body | 2 MiB | `--max-body-bytes` | 413 |
| time to read a body | 30 s | `--timeout-body` | 408 |
| time to send a request's headers | 15 s | `--timeout-header` | connection closed |
| idle keep-alive connection | 5 s | `--timeout-keep-alive` | connection closed |
| open connections and requests | 1024 | `--limit-concurrency` | 503 |
| JSON nesting / digits of an integer | 32 / 40 | - | 400 |
| prompts in one request | 64 | `--max-prompts` | 400 `prompt` |
| token ids of a prompt | the model's context | - | 400 `prompt` |
| characters of a text prompt, message, question, passage | context x longest token | `--max-prompt-chars` | 400 |
| messages | 256 | `--max-messages` | 400 `messages` |
| passages | 64 | `--max-passages` | 400 `passages` |
| stop strings / their characters | 64 / 256 | `--max-stop`, `--max-stop-chars` | 400 `stop` |
| stop token ids | 64 | `--max-stop` | 400 `stop_token_ids` |
| rows of one request (n x prompts, ndocs x beam) | a quarter of `--max-pending` | `--max-request-rows` | 400 |

A text prompt longer than the context times the longest token the tokenizer has can never fit: refusing it
refuses nothing the engine could serve, and bounds the tokenizer's work.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 2 * MIB
    body_timeout_s: float = 30.0
    header_timeout_s: float = 15.0
    keep_alive_s: int = 5
    limit_concurrency: int = 1024
    max_json_depth: int = 32
    max_int_digits: int = 40
    max_prompts: int = 64
    max_prompt_chars: int | None = None  # None: the model's context x the longest token's characters
    max_messages: int = 256
    max_passages: int = 64
    max_stop: int = 64
    max_stop_chars: int = 256
    max_request_rows: int | None = None  # None: a quarter of the admission bound

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_int_digits", "max_prompts", "max_messages",
                     "max_passages", "max_stop", "max_stop_chars", "limit_concurrency", "keep_alive_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_prompt_chars", "max_request_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerLimits":
        return cls(max_body_bytes=args.max_body_bytes, body_timeout_s=args.timeout_body,
                   header_timeout_s=args.timeout_header, keep_alive_s=args.timeout_keep_alive,
                   limit_concurrency=args.limit_concurrency, max_prompts=args.max_prompts,
                   max_prompt_chars=args.max_prompt_chars, max_messages=args.max_messages,
                   max_passages=args.max_passages, max_stop=args.max_stop, max_stop_chars=args.max_stop_chars,
                   max_request_rows=args.max_request_rows)


class LimitError(Exception):
    """A body beyond a bound: the HTTP status, the field at fault (None: the body), and what is wrong."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# -- parsing --------------------------------------------------------------------------------------------------

def parse_json(body: bytes, limits: ServerLimits) -> Any:
    """The body as JSON, refusing (400) bytes that are not UTF-8, integers of more than max_int_digits digits,
    NaN and infinities (JSON has none; Python's parser would read them) and nesting deeper than
    max_json_depth."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LimitError(400, f"the body is not valid UTF-8 (byte {e.start} is {body[e.start:e.start + 1]!r})",
                         code="invalid_json") from None

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > limits.max_int_digits:
            raise LimitError(400, f"an integer of {len(s.lstrip('-'))} digits is more than this server reads "
                                  f"({limits.max_int_digits})", code="invalid_json")
        return int(s)

    try:
        obj = json.loads(text, parse_int=parse_int)
    except LimitError:
        raise
    except json.JSONDecodeError as e:
        raise LimitError(400, f"the body is not JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         code="invalid_json") from None
    except RecursionError:
        raise LimitError(400, f"the body nests deeper than this server reads ({limits.max_json_depth} levels)",
                         code="invalid_json") from None
    _walk(obj, limits.max_json_depth, 10 ** limits.max_int_digits)
    return obj


def _walk(obj: Any, max_depth: int, int_bound: int) -> None:
    """Refuses nesting deeper than max_depth and the NaN, Infinity and overflowing numbers Python's parser
    reads (JSON has none), naming the top-level field they are in. A number with no fraction (`2.0`, `1e3`) is
    an integer to JSON Schema, and so to this server: within the integers the parser reads, it is made one in
    place (a float field takes it unchanged)."""
    todo: list[tuple[Any, Any, Any, int, str | None, str]] = [(obj, None, None, 1, None, "")]
    while todo:
        node, parent, key, depth, top, path = todo.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                what = "NaN" if math.isnan(node) else "Infinity" if node > 0 else "-Infinity"
                raise LimitError(400, f"{path or 'body'}: {what} is not a number JSON allows (numbers are "
                                      f"finite)", top, "invalid_number")
            if node.is_integer() and abs(node) < int_bound and parent is not None:
                parent[key] = int(node)
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise LimitError(400, f"the body nests deeper than this server reads ({max_depth} levels)",
                                 top, "invalid_json")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                todo.append((v, node, k, depth + 1, top if top is not None else (k if isinstance(k, str) else None),
                             f"{path}.{k}" if path else str(k)))


# -- bounds on the fields --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelBounds:
    """What the served model allows: its context, and how many characters one token can cover."""
    max_model_len: int
    longest_token_chars: int


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token (a piece's '▁' stands for one space), an upper bound of any token's
    share of a text."""
    longest = 1
    for i in range(tokenizer.vocab_size):
        try:
            longest = max(longest, len(tokenizer.id_to_token(i)))
        except Exception:  # noqa: BLE001 - an id without a piece covers no text
            continue
    return longest


@dataclass(frozen=True)
class BodyChecks:
    """The bounds of `ServerLimits` resolved against the served model and the admission bound."""
    limits: ServerLimits
    max_model_len: int
    max_prompt_chars: int
    max_request_rows: int

    @classmethod
    def resolve(cls, limits: ServerLimits, model: ModelBounds, admission_rows: int) -> "BodyChecks":
        chars = limits.max_prompt_chars or model.max_model_len * model.longest_token_chars
        rows = limits.max_request_rows or max(1, admission_rows // 4)
        return cls(limits, model.max_model_len, chars, min(rows, admission_rows))

    def check(self, path: str, body: Any) -> None:
        """Raises LimitError (400, naming the field) for a body beyond a bound. Only the fields' sizes are
        checked here; their types and values are the request models' to check."""
        if not isinstance(body, dict):
            return
        if path == "/v1/completions":
            prompts = self._prompts(body.get("prompt"))
            self._stop(body)
            self._rows(_samples(body) * max(prompts, 1), "n",
                       f"n={_samples(body)} choices (or best_of) of {max(prompts, 1)} prompt(s)")
        elif path == "/v1/chat/completions":
            self._messages(body.get("messages"))
            self._stop(body)
            if isinstance(body.get("selfrag"), dict):
                self._selfrag(body["selfrag"], "selfrag.")
            else:
                self._rows(_samples(body), "n", f"n={_samples(body)} choices (or best_of)")
        elif path == "/v1/selfrag":
            self._selfrag(body, "")

    def _chars(self, value: Any, param: str, what: str) -> None:
        if isinstance(value, str) and len(value) > self.max_prompt_chars:
            raise LimitError(400, f"{what} has {len(value)} characters, more than this server reads "
                                  f"({self.max_prompt_chars}: the model's context of {self.max_model_len} tokens "
                                  f"cannot hold more)", param, "too_long")

    def _ids(self, value: Any, param: str, what: str) -> None:
        if isinstance(value, list) and len(value) > self.max_model_len:
            raise LimitError(400, f"{what} has {len(value)} token ids, more than the model's context of "
                                  f"{self.max_model_len} tokens", param, "too_long")

    def _prompts(self, prompt: Any) -> int:
        if isinstance(prompt, str):
            self._chars(prompt, "prompt", "prompt")
            return 1
        if not isinstance(prompt, list):
            return 0
        if prompt and all(isinstance(p, int) for p in prompt[:1]) and not isinstance(prompt[0], bool):
            self._ids(prompt, "prompt", "prompt")
            return 1
        if len(prompt) > self.limits.max_prompts:
            raise LimitError(400, f"prompt has {len(prompt)} prompts, more than this server takes in one request "
                                  f"({self.limits.max_prompts})", "prompt", "too_many")
        for i, p in enumerate(prompt):
            self._chars(p, "prompt", f"prompt.{i}")
            self._ids(p, "prompt", f"prompt.{i}")
        return len(prompt)

    def _stop(self, body: dict) -> None:
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > self.limits.max_stop:
            raise LimitError(400, f"stop has {len(stops)} strings, more than this server takes "
                                  f"({self.limits.max_stop})", "stop", "too_many")
        for i, s in enumerate(stops):
            if isinstance(s, str) and len(s) > self.limits.max_stop_chars:
                raise LimitError(400, f"stop.{i} has {len(s)} characters, more than a stop string may have "
                                      f"({self.limits.max_stop_chars})", "stop", "too_long")
        ids = body.get("stop_token_ids")
        if isinstance(ids, list) and len(ids) > self.limits.max_stop:
            raise LimitError(400, f"stop_token_ids has {len(ids)} ids, more than this server takes "
                                  f"({self.limits.max_stop})", "stop_token_ids", "too_many")

    def _messages(self, messages: Any) -> None:
        if not isinstance(messages, list):
            return
        if len(messages) > self.limits.max_messages:
            raise LimitError(400, f"messages has {len(messages)} messages, more than this server takes "
                                  f"({self.limits.max_messages})", "messages", "too_many")
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), (str, list)) \
                    and not _content_text(m["content"]).strip():
                raise LimitError(400, f"messages.{i}: a user message has no text", "messages", "empty")
        total = sum(len(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))
        if total > self.max_prompt_chars:
            raise LimitError(400, f"messages have {total} characters, more than this server reads "
                                  f"({self.max_prompt_chars}: the model's context of {self.max_model_len} tokens "
                                  f"cannot hold more)", "messages", "context_length_exceeded")

    def _selfrag(self, body: dict, prefix: str) -> None:
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > self.max_model_len - 2:
            # A Self-RAG prompt has at least two tokens: more than this can never be generated (no silent cut).
            raise LimitError(400, f"{prefix}max_tokens: {max_tokens} tokens cannot be generated within the model's "
                                  f"context of {self.max_model_len} tokens", f"{prefix}max_tokens",
                             "context_length_exceeded")
        self._chars(body.get("question"), f"{prefix}question", f"{prefix}question")
        passages = body.get("passages")
        if isinstance(passages, list):
            if len(passages) > self.limits.max_passages:
                raise LimitError(400, f"{prefix}passages has {len(passages)} passages, more than this server takes "
                                      f"({self.limits.max_passages})", f"{prefix}passages", "too_many")
            for i, p in enumerate(passages):
                if isinstance(p, dict):
                    for key in ("title", "text"):
                        self._chars(p.get(key), f"{prefix}passages", f"{prefix}passages.{i}.{key}")
        ndocs = _branches(body)
        if body.get("form") == "long":
            beam = _count(body.get("beam_width"), 2)
            self._rows(ndocs * beam, f"{prefix}ndocs", f"ndocs={ndocs} branches for each of beam_width={beam} nodes")
        else:
            self._rows(ndocs, f"{prefix}ndocs", f"ndocs={ndocs} branches")

    def _rows(self, rows: int, param: str, what: str) -> None:
        if rows > self.max_request_rows:
            raise LimitError(400, f"{what} run {rows} sequences at once, more than one request may take on this "
                                  f"server ({self.max_request_rows}); send fewer, or several requests",
                             param, "too_many_rows")


def _content_text(content: Any) -> str:
    """A message's text as the chat endpoint reads it: a string, or its text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _samples(body: dict) -> int:
    """Sequences per prompt: n, or best_of when it asks for more."""
    return max(_count(body.get("n")), _count(body.get("best_of")))


def _count(value: Any, default: int = 1) -> int:
    """A count field as the request models will read it, or its default where it is not a plain integer
    (the models refuse those)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return default


def request_rows(path: str, body: Any) -> int:
    """Sequences a request runs at once: what it takes of the server's admission."""
    if not isinstance(body, dict):
        return 1
    if path == "/v1/completions":
        prompt = body.get("prompt")
        prompts = (len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1)
        return _samples(body) * prompts
    opts = body.get("selfrag") if path == "/v1/chat/completions" else body
    if path == "/v1/chat/completions" and not isinstance(opts, dict):
        return _samples(body)
    if isinstance(opts, dict):
        if opts.get("mode") == "never":
            return 1
        return _branches(opts) * (_count(opts.get("beam_width"), 2) if opts.get("form") == "long" else 1)
    return 1


def _branches(opts: dict) -> int:
    """Branches of a Self-RAG step: ndocs, or fewer when fewer passages are given."""
    ndocs = _count(opts.get("ndocs"), 5)
    passages = opts.get("passages")
    return min(ndocs, max(len(passages), 1)) if isinstance(passages, list) else ndocs
