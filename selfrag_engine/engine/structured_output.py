"""Structured output: a request's text held to a JSON schema, any JSON object, a regular expression, a list of
choices or an EBNF grammar, by masking the tokens its grammar cannot take before each draw (xgrammar, as vLLM
and SGLang use it).

- `StructuredOutput` is the request's constraint (`SamplingParams.structured`): exactly one of its fields set,
  parsed when it is made, so a bad schema, regex or grammar is a RequestError naming the problem.
- `Grammars` (one per engine) sees the engine's vocabulary as xgrammar does (`xgrammar_vocab`: SentencePiece
  pieces with '▁' as a space and `<0x..>` as bytes; special and added tokens never match text) and compiles
  each constraint once per (kind, spec); a request gets a `GrammarState`, its matcher.
- Each step, `constrain` redraws the rows that carry a grammar from their logits with the grammar's token
  bitmask applied (one batched application, xgrammar's CPU kernel on the CPU, its Triton kernel on CUDA);
  rows without one are untouched and pay nothing. The output processor advances a row's matcher with each
  token it appends (`engine/output.py`); EOS is allowed only where the grammar may end.

What stays readable under a grammar: the sampler's scores (the chosen token's log-probability, the top-n, the
reflection-token groups' probabilities) are of the row's logits before the mask, as they are before
temperature and truncation: a constrained Self-RAG request with `reflection=True` still reads p([Retrieval]),
p([Relevant]), ... at every step, although the mask keeps the reflection tokens themselves (not text of any
grammar) out of its output.

What steps aside for constrained rows: the decode step launched ahead of the previous one's tokens (a mask
needs the token before it on the host; engine/stepping.py) and speculation's drafts (a constrained row is
verified with no draft; engine/speculative.py). CUDA graphs are unaffected: a graph computes the logits, and
the mask is applied to them after the replay.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import torch

from selfrag_engine.backend import Backend
from selfrag_engine.errors import RequestError
from selfrag_engine.layers.sampler import SamplerOutput, finite_logits, sample
from selfrag_engine.tokenizer import Tokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# xgrammar's errors start with "[time] /path/file.cc:line: "; the rest names the problem.
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _xgrammar():
    # Imported on first use: xgrammar loads transformers, which a request without a grammar never needs.
    try:
        import xgrammar
    except ImportError as e:
        raise RequestError(f"structured output needs the xgrammar package ({e}); install it with "
                           "`pip install xgrammar` (or the selfrag-engine[structured] extra)") from None
    return xgrammar


@dataclass
class StructuredOutput:
    """The shape a request's output must take; exactly one field set.

    json: a JSON schema (a dict, or its JSON text); json_object: any JSON object; regex: a regular expression
    the whole output matches; choice: one of these strings, exactly; grammar: an EBNF grammar (xgrammar's
    GBNF dialect, a `root` rule first). JSON is generated compact (no free whitespace), so a model cannot
    spend its tokens on blanks; it parses with any JSON reader. The output ends (EOS) once the grammar is
    complete; `max_tokens` or a stop string may cut it earlier (finish_reason "length" / "stop").
    """
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise RequestError(f"structured output: json_object must be True or False, got {self.json_object!r}")
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise RequestError("structured output needs exactly one of json, json_object, regex, choice, grammar; "
                               f"got {', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise RequestError(f"structured output: json must be a JSON schema (a dict or its JSON text), "
                               f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError(f"structured output: {name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise RequestError(f"structured output: choice must be a non-empty list of strings, got {self.choice!r}")
            if any(not isinstance(c, str) or not c for c in self.choice):
                raise RequestError(f"structured output: choice strings must be non-empty strings, got {self.choice!r}")
            self.choice = list(self.choice)
        _parse(*self.key)  # refuses a bad schema, regex or grammar now, naming the problem

    @classmethod
    def from_dict(cls, value: dict) -> "StructuredOutput":
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise RequestError(f"structured output: unknown field(s) {', '.join(map(str, unknown))}; "
                               f"the fields are {', '.join(KINDS)}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec as text): what a compiled grammar is cached by."""
        kind = self.kind
        if kind == "json":
            if isinstance(self.json, str):
                return kind, self.json
            try:  # key order kept: it is the order the properties are generated in
                return kind, json.dumps(self.json, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise RequestError(f"structured output: json schema is not JSON: {e}") from None
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, json.dumps(self.choice, ensure_ascii=False)
        return kind, getattr(self, kind)


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string escapes are EBNF's (\" \\ \n \t \uXXXX); non-ASCII characters stay as they are.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


@lru_cache(maxsize=512)
def _parse(kind: str, spec: str) -> Any:
    """The xgrammar Grammar of a (kind, spec); RequestError naming what is wrong with it."""
    xgr = _xgrammar()
    try:
        if kind == "json":
            try:
                schema = json.loads(spec)
            except ValueError as e:
                raise RequestError(f"structured output: json schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise RequestError(f"structured output: a json schema is a JSON object, got {spec!r}")
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(spec)))
        return xgr.Grammar.from_ebnf(spec)
    except RequestError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors with the reason
        what = {"json": "json schema", "json_object": "json object", "regex": "regex", "choice": "choice",
                "grammar": "grammar"}[kind]
        reason = _XGR_PREFIX.sub("", str(e).strip()).strip() or type(e).__name__
        raise RequestError(f"structured output: invalid {what}: {reason}") from None


def xgrammar_vocab(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary as xgrammar's byte-fallback decoding reads it: each SentencePiece piece ('▁' a space,
    `<0x..>` one byte); "" for the special tokens and the added tokens past the pieces (the Self-RAG
    reflection and paragraph tokens), which xgrammar then never lets match text."""
    special = tokenizer.special_ids
    return ["" if i in special or i >= tokenizer.num_pieces else tokenizer.id_to_token(i)
            for i in range(tokenizer.vocab_size)]


class GrammarState:
    """One request's matcher: where its output stands in its grammar."""

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.num_accepted = 0

    def accept(self, token: int) -> bool:
        """Advances past the appended token; False when the grammar refuses it (the mask let it through only
        if the row had no allowed token with a finite logit)."""
        if self.matcher.is_terminated() or not self.matcher.accept_token(int(token)):
            return False
        self.num_accepted += 1
        return True

    def rollback_to(self, num_tokens: int) -> None:
        """Back to after the request's first num_tokens output tokens (a step that failed is undone)."""
        if num_tokens < self.num_accepted:
            self.matcher.rollback(self.num_accepted - num_tokens)
            self.num_accepted = num_tokens

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def completed(self) -> bool:
        """Whether the output so far is a whole sentence of the grammar."""
        return self.matcher.is_completed()


class Grammars:
    """An engine's grammar compiler over its tokenizer's vocabulary, with compiled grammars cached by
    (kind, spec). Built on the first constrained request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cached: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits' width; ids past the tokenizer's are never allowed
        self.max_cached = max_cached
        self._compiler = None
        self._compiled: dict[tuple[str, str], Any] = {}

    def _get_compiler(self):
        if self._compiler is None:
            xgr = _xgrammar()
            if self.tokenizer.eos_id is None:
                raise RequestError("structured output needs a tokenizer with an EOS token to end the output")
            info = xgr.TokenizerInfo(xgrammar_vocab(self.tokenizer), xgr.VocabType.BYTE_FALLBACK,
                                     vocab_size=self.vocab_size, stop_token_ids=[self.tokenizer.eos_id],
                                     add_prefix_space=self.tokenizer.legacy)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compiled(self, spec: StructuredOutput) -> Any:
        key = spec.key
        if key not in self._compiled:
            compiler = self._get_compiler()
            try:
                compiled = compiler.compile_grammar(_parse(*key))
            except RequestError:
                raise
            except Exception as e:
                raise RequestError(f"structured output: the {spec.kind} cannot be compiled for this vocabulary: "
                                   f"{_XGR_PREFIX.sub('', str(e).strip())}") from None
            if len(self._compiled) >= self.max_cached:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = compiled
        return self._compiled[key]

    def state(self, spec: StructuredOutput) -> GrammarState:
        """A fresh matcher for a request's output."""
        return GrammarState(_xgrammar().GrammarMatcher(self.compiled(spec)))


def mask_backend(backend: Backend, device: torch.device) -> str:
    """xgrammar's bitmask kernel for the engine's backend: its Triton kernel where ours run compiled (CUDA),
    its C++ kernel for CPU tensors, its torch implementation for the torch path on CUDA."""
    if device.type == "cpu":
        return "cpu"
    return "triton" if backend.kernels and not backend.interpreted else "torch_native"


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, backend: Backend) -> None:
    """Sets to -inf, in place, every logit whose bit is 0. logits [R, V] float32; bitmask [R, ceil(V / 32)]
    int32 on the host (bit j % 32 of word j // 32: token j allowed), moved to the logits' device here."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1],
                                            backend=mask_backend(backend, logits.device))


def fill_bitmask(states: list[GrammarState], vocab_size: int) -> torch.Tensor:
    """int32 [len(states), ceil(vocab_size / 32)] on the host: row i, the tokens states[i] allows next."""
    bitmask = _xgrammar().allocate_token_bitmask(len(states), vocab_size)
    for i, state in enumerate(states):
        state.fill(bitmask, i)
    return bitmask


def constrain(logits: torch.Tensor, states: list[GrammarState | None], out: SamplerOutput,
              temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seeds: torch.Tensor,
              backend: Backend, draw: torch.Tensor | None = None) -> SamplerOutput:
    """`out` (the sampler's output over logits [B, V]) with the tokens of the rows whose state is not None
    redrawn from their masked logits, with the same temperature, top-k, top-p and seed; their log-probability
    is the new token's under the unmasked logits (as every score of `out`). `draw`, when given, are the logits
    the tokens are drawn from (processed: penalties, bias, min-p), the scores staying those of `logits`. Rows
    without a state are left as they are; with none, nothing is done."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return out
    idx = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
    masked = (logits if draw is None else draw).index_select(0, idx).float()
    apply_bitmask(masked, fill_bitmask([states[i] for i in rows], logits.shape[1]), backend)
    drawn = sample(masked, temperature.index_select(0, idx), top_p.index_select(0, idx),
                   top_k.index_select(0, idx), seeds.index_select(0, idx), backend=backend).tokens
    raw = finite_logits(logits.index_select(0, idx)).gather(1, drawn.unsqueeze(-1)).squeeze(-1)
    out.tokens = out.tokens.index_copy(0, idx, drawn)
    out.logprobs = out.logprobs.index_copy(0, idx, raw - out.lse.index_select(0, idx))
    return out
