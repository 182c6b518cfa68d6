"""Short-form Self-RAG: one answer, with an adaptive retrieval decision and K critiqued passage branches.

The prompt is prefilled once. Its first generated position gives the retrieval decision; then either K
branches are forked off the prompt's cache, one per passage, and decoded in one batch, or the prompt
continues after `[No Retrieval]`. The paper's rules (Appendix A.3) are used throughout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from selfrag_engine.engine.llm_engine import Engine, RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.selfrag.prompts import GROUPS, format_passage, format_prompt, postprocess
from selfrag_engine.selfrag.scoring import (ScoringConfig, final_score, grounding_score, relevance_score,
                                            retrieval_gate, sequence_score, utility_score)

MODES = ("adaptive", "always", "never")


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    id: str | None = None


@dataclass
class Branch:
    """One retrieval branch: its passage, output and critique (probabilities at the positions read)."""
    passage: Passage
    text: str
    token_ids: list[int]
    relevance: float
    grounding: float
    utility: float
    seq_score: float
    final: float
    probs: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Answer:
    question: str
    answer: str
    retrieved: bool
    retrieval_probability: float | None  # the gate value; None when the mode forced the decision
    branches: list[Branch]
    best: int | None  # index into branches
    num_generated_tokens: int
    seconds: float


def group_probs(out: RequestOutput, step: int) -> dict[str, dict[str, float]]:
    """Group-normalized reflection probabilities at a generated step, by group and token string."""
    row = out.reflection_probs[step]
    groups = out.reflection_groups
    return {name: dict(zip(GROUPS[name], row[groups.span(name)].tolist())) for name in groups.names}


def critique(out: RequestOutput, ids: dict[str, tuple[int, ...]], cfg: ScoringConfig) -> tuple[
        float, float, float, float, float, dict[str, dict[str, float]]]:
    """(relevance, grounding, utility, seq score, final, probs read) of a retrieval branch's output."""
    read: dict[str, dict[str, float]] = {}
    p0 = group_probs(out, 0)
    read["relevance"] = p0["relevance"]
    rel = relevance_score(*p0["relevance"].values())
    grd = util = 0.0
    grounding_ids, utility_ids = set(ids["grounding"]), set(ids["utility"])
    for step, token in enumerate(out.token_ids):
        if token in grounding_ids:
            read["grounding"] = group_probs(out, step)["grounding"]
            grd = grounding_score(*read["grounding"].values())
            break
    for step, token in enumerate(out.token_ids):
        if token in utility_ids:
            read["utility"] = group_probs(out, step)["utility"]
            util = utility_score(list(read["utility"].values()))
            break
    seq = sequence_score(out.cumulative_logprob, len(out.token_ids))
    return rel, grd, util, seq, final_score(rel, grd, util, seq, cfg), read


class SelfRAG:
    """Self-RAG inference over an engine and an optional retriever (anything with
    `search(query, k) -> list[Passage]`); passages may also be given per question."""

    def __init__(self, engine: Engine, retriever=None, scoring: ScoringConfig | None = None,
                 ndocs: int = 5, max_new_tokens: int = 100, mode: str = "adaptive"):
        self.engine = engine
        self.retriever = retriever
        self.scoring = scoring or ScoringConfig()
        self.ndocs = ndocs
        self.max_new_tokens = max_new_tokens
        self.mode = mode
        ref = engine.tokenizer.reflection_token_ids()
        self.ids = ref.groups()
        self.control_ids = {t for g in self.ids.values() for t in g} | {ref.paragraph_open, ref.paragraph_close}
        if engine.reflection_groups is None:
            raise ValueError("the engine's tokenizer has no Self-RAG reflection tokens")

    def _text(self, token_ids: Sequence[int]) -> str:
        kept = [t for t in token_ids if t not in self.control_ids and t != self.engine.tokenizer.eos_id]
        return postprocess(self.engine.tokenizer.decode(kept, skip_special_tokens=True))

    def answer(self, question: str, passages: Sequence[Passage] | None = None, *, input: str | None = None,
               mode: str | None = None, ndocs: int | None = None, closed_set: bool = False) -> Answer:
        return self.answer_batch([question], [passages] if passages is not None else None, input=input,
                                 mode=mode, ndocs=ndocs, closed_set=closed_set)[0]

    def answer_batch(self, questions: Sequence[str], passages: Sequence[Sequence[Passage] | None] | None = None,
                     *, input: str | None = None, mode: str | None = None, ndocs: int | None = None,
                     closed_set: bool = False) -> list[Answer]:
        """Answers several questions together: their prompts prefill in one batch, then every question's
        branches (or no-retrieval continuation) decode in one batch."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        ndocs = ndocs or self.ndocs
        engine, tok = self.engine, self.engine.tokenizer
        start = time.perf_counter()
        prompts = [tok.encode(format_prompt(q, input)) for q in questions]
        first = SamplingParams(max_tokens=1, temperature=0.0, reflection=True)
        parents = [engine.add_request(p, first, keep_cache=True) for p in prompts]
        decode = SamplingParams(max_tokens=self.max_new_tokens, temperature=0.0, reflection=True)
        plans = []
        try:
            heads = engine.run(parents)
            for i, (question, head) in enumerate(zip(questions, heads)):
                gate = None
                if mode == "adaptive":
                    p = group_probs(head, 0)["retrieval"]
                    gate = retrieval_gate(p["[Retrieval]"], p["[No Retrieval]"])
                retrieve = mode == "always" or (mode == "adaptive" and gate > self.scoring.threshold)
                docs = None
                if retrieve:
                    docs = list(passages[i]) if passages is not None and passages[i] is not None else None
                    if docs is None:
                        if self.retriever is None:
                            raise ValueError("retrieval was chosen but neither passages nor a retriever were given")
                        docs = list(self.retriever.search(question, ndocs))
                    docs = docs[:ndocs]
                if docs:
                    suffixes = [tok.encode(format_passage(d.title, d.text), add_bos=False) for d in docs]
                else:
                    suffixes = [[self.ids["retrieval"][1]]]  # continue after [No Retrieval]
                kids = engine.fork(parents[i], suffixes, decode, prefix_len=len(prompts[i]))
                plans.append((gate, docs, kids))
        except BaseException:
            for _, _, kids in plans:
                for k in kids:
                    engine.forget(k)
            raise
        finally:
            for p in parents:
                engine.forget(p)
        outputs = engine.run([k for _, _, kids in plans for k in kids])
        answers = []
        at = 0
        for question, (gate, docs, kids) in zip(questions, plans):
            outs = outputs[at:at + len(kids)]
            at += len(kids)
            answers.append(self._assemble(question, gate, docs, outs, closed_set, start))
        for _, _, kids in plans:
            for k in kids:
                engine.forget(k)
        return answers

    def _assemble(self, question: str, gate: float | None, docs: list[Passage] | None,
                  outs: list[RequestOutput], closed_set: bool, start: float) -> Answer:
        n_tokens = sum(len(o.token_ids) for o in outs)
        elapsed = time.perf_counter() - start
        if not docs:
            return Answer(question, self._text(outs[0].token_ids), False, gate, [], None, n_tokens, elapsed)
        branches = []
        for doc, out in zip(docs, outs):
            rel, grd, util, seq, final, read = critique(out, self.ids, self.scoring)
            branches.append(Branch(doc, self._text(out.token_ids), out.token_ids, rel, grd, util, seq, final, read))
        if closed_set:
            totals: dict[str, float] = {}
            for b in branches:
                totals[b.text] = totals.get(b.text, 0.0) + b.final
            best_text = max(totals, key=totals.get)
            best = next(i for i, b in enumerate(branches) if b.text == best_text)
        else:
            best = max(range(len(branches)), key=lambda i: branches[i].final)
        return Answer(question, branches[best].text, True, gate, branches, best, n_tokens, elapsed)

