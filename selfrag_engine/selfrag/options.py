"""A Self-RAG query's options to its algorithm and its answer back to plain records, in one place.

`QueryOptions` (form, mode, ndocs, compat, threshold, the score weights, lengths, the long form's beam) gives
the `ScoringConfig` (`scoring`) and the short- or long-form runner (`runner`); `passages_from` reads passages
given as dicts; `answer_record` / `segment_record` turn an answer (either form) and a long-form segment into
dicts of plain values. The HTTP server, the C++ API's Python side, `selfrag-engine ask` and the evaluation's
`build_runner` all go through here, so an option means the same everywhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from selfrag_engine.engine.client import EngineClient
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.long_form import LongAnswer, LongFormSelfRAG, Segment, check_released_tree
from selfrag_engine.selfrag.scoring import COMPATS, FORMS, ScoringConfig
from selfrag_engine.selfrag.short_form import Answer, SelfRAG

# The score weights and switches a caller may override on top of the compat flavour's preset.
SCORE_KNOBS = ("w_rel", "w_sup", "w_use", "use_seqscore")


@dataclass(frozen=True)
class QueryOptions:
    """How to answer a query. None leaves a value to the compat flavour's preset (the score knobs) or to the
    form's runner (max_new_tokens: 100 short, 300 long; beam_width 2, max_depth 7). threshold None: in the
    paper flavour the model's own first token decides whether to retrieve."""
    form: str = "short"
    mode: str = "adaptive"
    ndocs: int = 5
    compat: str = "paper"
    threshold: float | None = 0.2
    w_rel: float | None = None
    w_sup: float | None = None
    w_use: float | None = None
    use_seqscore: bool | None = None
    max_new_tokens: int | None = None
    beam_width: int | None = None
    max_depth: int | None = None

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise RequestError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.compat not in COMPATS:
            raise RequestError(f"compat must be one of {COMPATS}, got {self.compat!r}")
        for name in ("beam_width", "max_depth"):
            if self.form == "short" and getattr(self, name) is not None:
                raise RequestError(f"{name}: an option of the long form's tree; the short form has none (leave "
                                   f"{name} out, or ask for form 'long')")
        if self.form == "long" and self.compat == "released":
            check_released_tree(self.max_depth, self.mode)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], **renamed: str) -> "QueryOptions":
        """The options a mapping (a request body, a C++ caller's dict) gives, absent or None keys left at their
        defaults (but a threshold given as None is kept); `renamed` maps a field to the key that carries it
        (max_new_tokens="max_tokens")."""
        fields = {name: options[renamed.get(name, name)] for name in cls.__dataclass_fields__
                  if options.get(renamed.get(name, name)) is not None}
        if "threshold" in options:  # None is a value here: the model's own first token decides
            fields["threshold"] = options["threshold"]
        return cls(**fields)

    def scoring(self) -> ScoringConfig:
        """The compat flavour's preset (ScoringConfig.paper / .released for this form) with the knobs set."""
        knobs: dict[str, Any] = {k: getattr(self, k) for k in SCORE_KNOBS if getattr(self, k) is not None}
        knobs["threshold"] = self.threshold
        if self.compat == "paper":
            return ScoringConfig.paper(**knobs)
        return ScoringConfig.released(form=self.form, **knobs)

    def runner(self, engine: EngineClient, retriever: Any = None) -> SelfRAG | LongFormSelfRAG:
        """A SelfRAG (short form) or LongFormSelfRAG (long form) over `engine` with these options."""
        kwargs: dict[str, Any] = {"retriever": retriever, "scoring": self.scoring(), "ndocs": self.ndocs,
                                  "mode": self.mode, "compat": self.compat}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.max_new_tokens
        if self.form == "short":
            return SelfRAG(engine, **kwargs)
        kwargs.update({k: getattr(self, k) for k in ("beam_width", "max_depth") if getattr(self, k) is not None})
        return LongFormSelfRAG(engine, **kwargs)


def passages_from(records: Sequence[Mapping[str, Any]] | None, field: str = "passages") -> list[Passage] | None:
    """Passages given as dicts with a 'text' (and a 'title', an 'id'); None stays None."""
    if records is None:
        return None
    passages = []
    for i, p in enumerate(records):
        if not isinstance(p, Mapping) or not isinstance(p.get("text"), str):
            raise RequestError(f"{field}.{i}: a passage needs a 'text' (and may have a 'title')")
        passages.append(Passage(title=p.get("title") or "", text=p["text"], id=p.get("id")))
    return passages


def _float(x: float | None) -> float | None:
    return None if x is None else float(x)


def passage_record(p: Passage | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"title": p.title or "", "text": p.text, "id": None if p.id is None else str(p.id)}


def segment_record(s: Segment) -> dict[str, Any]:
    """A long-form segment: its text, depth, passage and critique."""
    return {"text": s.text, "depth": int(s.depth), "passage": passage_record(s.passage),
            "relevance": _float(s.relevance), "grounding": _float(s.grounding), "utility": _float(s.utility),
            "final": _float(s.final), "score": _float(s.score)}


def answer_record(ans: Answer | LongAnswer) -> dict[str, Any]:
    """An answer of either form as one record: the short form's gate value, branches and best branch (None
    in the long form), the long form's segments, citations and score (None in the short form)."""
    if isinstance(ans, LongAnswer):
        return {"question": ans.question, "answer": ans.answer, "retrieved": bool(ans.retrieved),
                "retrieval_probability": None, "branches": [], "best": None,
                "citations": [passage_record(c) for c in ans.citations],
                "segments": [segment_record(s) for s in ans.segments], "score": _float(ans.score), "draft": None,
                "num_generated_tokens": int(ans.num_generated_tokens), "seconds": float(ans.seconds)}
    branches = [{"passage": passage_record(b.passage), "text": b.text, "relevance": float(b.relevance),
                 "grounding": float(b.grounding), "utility": float(b.utility), "final": float(b.final)}
                for b in ans.branches]
    return {"question": ans.question, "answer": ans.answer, "retrieved": bool(ans.retrieved),
            "retrieval_probability": _float(ans.retrieval_probability), "branches": branches,
            "best": None if ans.best is None else int(ans.best), "citations": None, "segments": [], "score": None,
            "draft": ans.draft, "num_generated_tokens": int(ans.num_generated_tokens), "seconds": float(ans.seconds)}


# ---- traces: why an answer came out as it did ---------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def short_form_trace(ans: Any) -> dict[str, Any]:
    """Why the short form answered as it did: the gate value and every branch's critique."""
    return {
        "retrieval_probability": ans.retrieval_probability,
        "best": ans.best,
        "answer": ans.answer,
        "num_generated_tokens": ans.num_generated_tokens,
        "branches": [{"title": b.passage.title, "passage_id": b.passage.id, "text": b.text,
                      "relevance": b.relevance, "grounding": b.grounding, "utility": b.utility,
                      "seq_score": b.seq_score, "final": b.final, "probs": _jsonable(b.probs)}
                     for b in ans.branches],
    }


def long_form_trace(ans: Any) -> dict[str, Any]:
    return {"answer": ans.answer, "segments": _jsonable(getattr(ans, "segments", None)),
            "citations": _jsonable(getattr(ans, "citations", None)),
            "num_generated_tokens": getattr(ans, "num_generated_tokens", None)}


def answer_trace(ans: Answer | LongAnswer) -> dict[str, Any]:
    return long_form_trace(ans) if isinstance(ans, LongAnswer) else short_form_trace(ans)
