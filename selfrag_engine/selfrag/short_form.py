"""Short-form Self-RAG: one answer, with an adaptive retrieval decision and K critiqued passage branches.

The prompt is prefilled once. Its first generated position gives the retrieval decision; then either K
branches are forked off the prompt's cache, one per passage, and decoded in one batch, or the prompt
continues after `[No Retrieval]`.

Two flavours (`compat`):
- "paper" (default): the paper's rules (Appendix A.3).
- "released" (or "official"): what the reference script run_short_form.py does, item by item: it first
  decodes a whole no-retrieval draft (max_new_tokens) and reads the gate off the draft's first position; the
  gate divides log-probabilities; branch critiques read top-5000 log-probabilities with -100 for a missing
  token; w_use is 1.0 (ScoringConfig.released(form="short")). Where the script would fail on a missing
  threshold, a RequestError says so. The draft and the branches still share the prompt's cached blocks.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from selfrag_engine.engine.client import EngineClient
from selfrag_engine.engine.output import RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.critique import Decoded, Reader, top_k_for
from selfrag_engine.selfrag.critique import critique as read_critique
from selfrag_engine.selfrag.decisions import (
    check_mode,
    decide_retrieval,
    passage_suffixes,
    unfit_passage,
)
from selfrag_engine.selfrag.owned import Owned
from selfrag_engine.selfrag.prompts import GROUPS, format_prompt, postprocess, script_postprocess
from selfrag_engine.selfrag.scoring import ScoringConfig, normalize_compat

__all__ = ["Answer", "Branch", "Passage", "SelfRAG", "critique", "group_probs"]


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
    draft: str | None = None  # compat="released": the no-retrieval draft decoded before the gate


def group_probs(out: RequestOutput, step: int) -> dict[str, dict[str, float]]:
    """Group-normalized reflection probabilities at a generated step, by group and token string."""
    row = out.reflection_probs[step]
    groups = out.reflection_groups
    return {name: dict(zip(GROUPS[name], row[groups.span(name)].tolist())) for name in groups.names}


def critique(out: RequestOutput, ids: dict[str, tuple[int, ...]], cfg: ScoringConfig, engine: EngineClient | None = None
             ) -> tuple[float, float, float, float, float, dict[str, dict[str, float]]]:
    """(relevance, grounding, utility, seq score, final, probs read) of a retrieval branch's output. With a
    truncated config (top_logprobs), `engine` serves the rank pass a read may need."""
    reader = Reader(cfg, engine.config.vocab_size if engine else None, engine.score if engine else None)
    c = read_critique(Decoded.from_output(out), reader, ids)
    return c.relevance, c.grounding, c.utility, c.seq_score, c.final, c.probs


@dataclass
class _Plan:
    """One question's state between the batched rounds."""
    question: str
    prompt: list[int]
    head: int
    head_out: RequestOutput | None = None
    draft: Decoded | None = None
    gate: float | None = None
    docs: list[Passage] | None = None
    kids: list[int] = field(default_factory=list)


class SelfRAG:
    """Self-RAG inference over an engine and an optional retriever (anything with
    `search(query, k) -> list[Passage]`); passages may also be given per question."""

    def __init__(self, engine: EngineClient, retriever=None, scoring: ScoringConfig | None = None,
                 ndocs: int = 5, max_new_tokens: int = 100, mode: str = "adaptive", compat: str = "paper"):
        if engine.reflection_groups is None:
            raise RequestError("the engine's tokenizer has no Self-RAG reflection tokens ([Retrieval], "
                               "[Relevant], [Utility:5], ...): load a Self-RAG checkpoint")
        check_mode(mode)
        for name, value in (("ndocs", ndocs), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        self.engine = engine
        self.retriever = retriever
        # Searches start when a question arrives and run beside its prefill and gate (`_start_searches`).
        self._search_pool: ThreadPoolExecutor | None = None
        self.compat = normalize_compat(compat)
        self.scoring = scoring or (ScoringConfig.paper() if self.compat == "paper"
                                   else ScoringConfig.released(form="short"))
        self.ndocs = ndocs
        self.max_new_tokens = max_new_tokens
        self.mode = mode
        ref = engine.tokenizer.reflection_token_ids()
        self.ids = ref.groups()
        self.control_ids = {t for g in self.ids.values() for t in g} | {ref.paragraph_open, ref.paragraph_close}

    def _text(self, token_ids: Sequence[int]) -> str:
        kept = [t for t in token_ids if t not in self.control_ids and t != self.engine.tokenizer.eos_id]
        return postprocess(self.engine.tokenizer.decode(kept, skip_special_tokens=True))

    def _script_text(self, token_ids: Sequence[int], context_ids: Sequence[int]) -> str:
        """What the released script holds for a generation: vLLM's text, special tokens left out and the
        first word's leading space kept (it post-processes only some of these strings)."""
        return self.engine.tokenizer.decode_continuation(token_ids, context_ids)

    def _params(self, max_tokens: int) -> SamplingParams:
        top = top_k_for(self.scoring, self.engine.config.vocab_size)
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, reflection=True, logprobs=top)

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
        check_mode(mode)
        ndocs = ndocs or self.ndocs
        if passages is not None and len(passages) != len(questions):
            raise RequestError(f"{len(questions)} questions but {len(passages)} passage lists")
        released = self.compat == "released"
        if released and mode == "adaptive" and self.scoring.threshold is None:
            raise RequestError("compat='released' with mode='adaptive' needs a threshold: the reference script "
                               "fails without one (it reads an undefined variable)")
        engine, tok = self.engine, self.engine.tokenizer
        start = time.perf_counter()
        prompts = [tok.encode(format_prompt(q, input)) for q in questions]
        searches = self._start_searches(questions, passages, mode, ndocs)
        with Owned(engine) as owned:
            first = SamplingParams(max_tokens=1, temperature=0.0, reflection=True)
            plans = [_Plan(q, p, owned.add(p, first, keep_cache=True)) for q, p in zip(questions, prompts)]
            for plan, out in zip(plans, owned.run([p.head for p in plans])):
                plan.head_out = out
            if released and mode != "always":
                self._decode_drafts(owned, plans)
            for i, plan in enumerate(plans):
                retrieve = self._decide(plan, mode)
                docs = None
                if retrieve:
                    given = passages[i] if passages is not None else None
                    if given is None:
                        if self.retriever is None:
                            raise RequestError(f"retrieval was chosen for question {i} but neither passages nor "
                                               "a retriever were given (pass passages, a retriever, or "
                                               "mode='never')")
                        given = searches[i].result()
                    docs = list(given)[:ndocs]
                if docs:
                    suffixes = passage_suffixes(tok, docs)
                    unfit = unfit_passage(len(plan.prompt), suffixes, docs, engine.max_model_len)
                    if unfit is not None:
                        raise unfit
                else:
                    suffixes = [[self.ids["retrieval"][1]]]  # continue after [No Retrieval]
                plan.docs = docs
                plan.kids = owned.fork(plan.head, suffixes, self._params(self.max_new_tokens),
                                       prefix_len=len(plan.prompt))
            outputs = owned.run([k for plan in plans for k in plan.kids])
            for plan in plans:
                owned.drop(plan.head)
            reader = Reader(self.scoring, engine.config.vocab_size, engine.score)
            answers, at = [], 0
            for plan in plans:
                outs = outputs[at:at + len(plan.kids)]
                at += len(plan.kids)
                answers.append(self._assemble(plan, outs, reader, closed_set, start))
        return answers

    def _start_searches(self, questions: Sequence[str], passages, mode: str, ndocs: int) -> list[Future | None]:
        """The retriever's search for every question that may need one, started now on a small thread pool so
        that it runs while the prompts prefill and the gate is read: the first answer token then waits for the
        longer of the two, not their sum. A search the gate turns down is left to finish and dropped."""
        if self.retriever is None or mode == "never":
            return [None] * len(questions)
        # A retriever that queues searches itself (BatchedSearch: submit(query, k) -> Future) needs no pool.
        submit = getattr(self.retriever, "submit", None)
        if submit is None:
            if self._search_pool is None:
                self._search_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="selfrag-search")
            search = self.retriever.search
            submit = lambda q, k: self._search_pool.submit(search, q, k)  # noqa: E731
        return [None if passages is not None and passages[i] is not None else submit(q, ndocs)
                for i, q in enumerate(questions)]

    def _decode_drafts(self, owned: Owned, plans: list[_Plan]) -> None:
        """The released script's whole no-retrieval draft: the head's first token continued to max_new_tokens
        (forked off the head, so the prompt is not prefilled again)."""
        eos = self.engine.tokenizer.eos_id
        rest = self.max_new_tokens - 1
        growing = []
        for plan in plans:
            plan.draft = Decoded.from_output(plan.head_out)
            if rest > 0 and plan.head_out.token_ids[-1] != eos:
                kid = owned.fork(plan.head, [plan.head_out.token_ids], self._params(rest),
                                 prefix_len=len(plan.prompt))[0]
                growing.append((plan, kid))
        outs = owned.run([kid for _, kid in growing])
        for (plan, kid), out in zip(growing, outs):
            plan.draft.extend(out)
            owned.drop(kid)

    def _decide(self, plan: _Plan, mode: str) -> bool:
        retrieve, plan.gate = decide_retrieval(Decoded.from_output(plan.head_out), mode, self.scoring,
                                               self.ids["retrieval"][0])
        return retrieve

    def _assemble(self, plan: _Plan, outs: list[RequestOutput], reader: Reader, closed_set: bool,
                  start: float) -> Answer:
        n_tokens = sum(len(o.token_ids) for o in outs)
        draft = None
        released = self.compat == "released"
        if plan.draft is not None:
            n_tokens += len(plan.draft.token_ids)
            draft = self._script_text(plan.draft.token_ids, plan.prompt)
        elapsed = time.perf_counter() - start
        if not plan.docs:
            # The script post-processes the answer it returns without retrieval (its own way: the space that
            # vLLM's text starts with stays).
            text = (script_postprocess(self._script_text(outs[0].token_ids, outs[0].prompt_token_ids)) if released
                    else self._text(outs[0].token_ids))
            return Answer(plan.question, text, False, plan.gate, [], None, n_tokens, elapsed, draft)
        branches = []
        for doc, out in zip(plan.docs, outs):
            c = read_critique(Decoded.from_output(out), reader, self.ids)
            text = self._script_text(out.token_ids, out.prompt_token_ids) if released else self._text(out.token_ids)
            branches.append(Branch(doc, text, out.token_ids, c.relevance, c.grounding, c.utility, c.seq_score,
                                   c.final, c.probs))
        if closed_set:
            # Final scores summed per answer string; the script post-processes each branch's text for it.
            key = script_postprocess if released else (lambda text: text)
            totals: dict[str, float] = {}
            for b in branches:
                totals[key(b.text)] = totals.get(key(b.text), 0.0) + b.final
            best_text = max(totals, key=totals.get)
            best = next(i for i, b in enumerate(branches) if key(b.text) == best_text)
            return Answer(plan.question, best_text, True, plan.gate, branches, best, n_tokens, elapsed, draft)
        best = max(range(len(branches)), key=lambda i: branches[i].final)
        # Open tasks: the script returns the best branch's text as vLLM gave it.
        return Answer(plan.question, branches[best].text, True, plan.gate, branches, best, n_tokens, elapsed, draft)
