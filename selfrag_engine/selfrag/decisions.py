"""The decisions both Self-RAG forms make the same way: whether a prompt retrieves (the retrieval modes and the
gate read at its first generated position), and whether passages fit in the model's context after a prefix.
"""
from __future__ import annotations

from typing import Sequence

from selfrag_engine.errors import ContextLengthError, RequestError
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.critique import Decoded, Reader
from selfrag_engine.selfrag.prompts import format_passage
from selfrag_engine.selfrag.scoring import ScoringConfig, retrieval_gate
from selfrag_engine.tokenizer import Tokenizer

# "adaptive": the gate decides; "always" / "never": the decision is forced and no gate is read.
MODES = ("adaptive", "always", "never")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise RequestError(f"mode must be one of {MODES}, got {mode!r}")


def gate_value(head: Decoded, gate: str) -> float:
    """The retrieval gate at the first generated position: "prob" divides the exact reflection probabilities
    of [Retrieval] and [No Retrieval], "logprob" their full-vocabulary log-probabilities (see
    `scoring.retrieval_gate`)."""
    if gate == "logprob":
        lp = Reader(ScoringConfig()).full_logprobs(head, 0, "retrieval")
        return retrieval_gate(lp["[Retrieval]"], lp["[No Retrieval]"], "logprob")
    p = Reader(ScoringConfig()).group(head, 0, "retrieval")
    return retrieval_gate(p["[Retrieval]"], p["[No Retrieval]"], "prob")


def decide_retrieval(head: Decoded, mode: str, cfg: ScoringConfig, retrieval_id: int) -> tuple[bool, float | None]:
    """(retrieve, gate value) for a prompt whose first generated token and reflection values are `head`. The
    gate is None when the mode forces the decision. With no threshold (the paper flavour's option) the
    model's own first token decides: `retrieval_id` ([Retrieval]) or not."""
    if mode != "adaptive":
        return mode == "always", None
    gate = gate_value(head, cfg.gate)
    if cfg.threshold is None:
        return head.token_ids[0] == retrieval_id, gate
    return gate > cfg.threshold, gate


def passage_suffixes(tokenizer: Tokenizer, docs: Sequence[Passage]) -> list[list[int]]:
    """The tokens each passage adds after its prefix: `[Retrieval]<paragraph>title\\ntext</paragraph>`."""
    return [tokenizer.encode(format_passage(d.title, d.text), add_bos=False) for d in docs]


def unfit_passage(prefix_len: int, suffixes: Sequence[Sequence[int]], docs: Sequence[Passage],
                  max_model_len: int) -> RequestError | None:
    """The error naming the first passage that leaves no room to generate after a `prefix_len`-token prefix,
    or None when every one fits. Neither passage nor instruction is ever cut."""
    for i, (suffix, doc) in enumerate(zip(suffixes, docs)):
        if prefix_len + len(suffix) >= max_model_len:
            return ContextLengthError(f"passage {i} ({doc.title!r}, {len(suffix)} tokens) leaves no room to "
                                      f"generate after the {prefix_len}-token prompt within the model's context "
                                      f"of {max_model_len} tokens")
    return None
