"""Held-out behaviour of a checkpoint trained on the world, measured through the engine and short-form Self-RAG.

    python -m selfrag_engine.tiny.evaluate [DIR] [--world-questions N] [--instructions N]

Everything goes through `Engine.from_pretrained` and `SelfRAG.answer_batch(mode="adaptive")`, so the numbers
exercise the tokenizer, the paged cache, forked branches, the sampler's reflection probabilities and the
critique scores, exactly as a user's query does:

- world questions about held-out entities, each with K=5 passages (the relevant one and the 4 non-relevant
  passages a lexical retriever ranks highest: people and towns with similar questions, namesakes in worlds
  that have them, the entity's other passage), shuffled:
  how often the model retrieves, how often the critique picks the relevant branch, and how often the final
  answer contains the gold attribute (case-insensitive, Self-RAG's `match`). A question answered without
  retrieval counts as a miss for the branch choice.
- no-fact instructions with values or phrasings training never used, each offered the 5 passages the
  lexical retriever returns for it: how often the model retrieves anyway, and how often its answer is
  exactly the expected one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.short_form import Answer, SelfRAG
from selfrag_engine.tiny.assets import default_checkpoint_dir, read_corpus
from selfrag_engine.tiny.training_data import (
    HELDOUT_FRACTION,
    SPLIT_SEED,
    WORLD_SEED,
    BranchCase,
    Example,
    LexicalIndex,
    Split,
    branch_cases,
    heldout_instructions,
    heldout_questions,
    split_world,
)
from selfrag_engine.tiny.world import World, build_world


@dataclass
class Evaluation:
    world_questions: int
    retrieval_rate_world: float      # fraction of world questions for which the gate chose to retrieve
    branch_choice: float             # fraction where the best-scored branch holds the relevant passage
    answer_match: float              # fraction whose final answer contains the gold attribute
    instructions: int
    retrieval_rate_instructions: float  # fraction of no-fact instructions for which it retrieved anyway
    instruction_exact: float         # fraction of no-fact answers equal to the expected answer
    seconds: float
    # Per distractor kind (see `distractor_kind`): how many distractors of that kind the cases held, and the
    # fraction of them the chosen branch was (a wrong pick), so the card can say which kind fools the model.
    distractors: dict[str, dict[str, float]] = field(default_factory=dict)
    # The world measures again for questions worded as in training ("trained") and in wordings training never
    # used ("held_out"): {wording: {"questions", "retrieval_rate", "branch_choice", "answer_match"}}.
    by_phrasing: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # a few misses, to read

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "failures"}


def world_and_split() -> tuple[World, Split]:
    """The world the committed model was trained on and its held-out split."""
    world = build_world(WORLD_SEED)
    return world, split_world(world, HELDOUT_FRACTION, SPLIT_SEED)


def _passages(ps: Sequence[Passage]) -> list[Passage]:
    # What a retriever would return: title, text and id, without the world's record of what a passage states.
    return [Passage(p.title, p.text, p.id) for p in ps]


def world_cases(world: World, split: Split, n: int | None, seed: int = 0) -> list[BranchCase]:
    """n held-out questions (all when None) with K=5 shuffled passages, one of them relevant."""
    total = len(heldout_questions(world, split))
    return branch_cases(world, split, total if n is None else min(n, total), k=5, seed=seed)


def instruction_cases(world: World, split: Split, n: int, seed: int = 0) -> list[tuple[Example, list[Passage]]]:
    """n held-out no-fact instructions, each with the 5 passages a lexical retriever returns for it."""
    index = LexicalIndex.build(world.passages)
    return [(ex, _passages(index.rank(ex.instruction)[:5])) for ex in heldout_instructions(world, split, n, seed)]


def answer_all(rag: SelfRAG, questions: Sequence[str], passages: Sequence[list[Passage]],
               batch_size: int) -> list[Answer]:
    out: list[Answer] = []
    for i in range(0, len(questions), batch_size):
        out += rag.answer_batch(questions[i:i + batch_size], passages[i:i + batch_size], mode="adaptive")
    return out


def distractor_kind(world: World, question_entity: str, passage_entity: str) -> str:
    """"same_title": the asked entity's other passage (same title, another attribute); "same_last" /
    "same_first": a person sharing the last / first name; "other": anything else (towns, other people)."""
    if passage_entity == question_entity:
        return "same_title"
    asked, other = world.entity(question_entity).name.split(), world.entity(passage_entity).name.split()
    if len(asked) == 2 == len(other):
        if asked[1] == other[1]:
            return "same_last"
        if asked[0] == other[0]:
            return "same_first"
    return "other"


def phrasing_breakdown(cases: Sequence[BranchCase], answers: Sequence[Answer]) -> dict[str, dict[str, float]]:
    """The world measures of `score_world` for the cases worded as in training and for held-out wordings."""
    out = {}
    for name, held in (("trained", False), ("held_out", True)):
        rows = [i for i, c in enumerate(cases) if c.question.heldout_phrasing == held]
        if rows:
            ret, chosen, matched, _ = score_world([cases[i] for i in rows], [answers[i] for i in rows])
            out[name] = {"questions": len(rows), "retrieval_rate": round(ret, 4), "branch_choice": round(chosen, 4),
                         "answer_match": round(matched, 4)}
    return out


def distractor_breakdown(world: World, cases: Sequence[BranchCase],
                         answers: Sequence[Answer]) -> dict[str, dict[str, float]]:
    shown: dict[str, int] = {}
    picked: dict[str, int] = {}
    for case, ans in zip(cases, answers, strict=True):
        for i, p in enumerate(case.passages):
            if i == case.gold_index:
                continue
            kind = distractor_kind(world, case.question.entity_id, p.entity_id)
            shown[kind] = shown.get(kind, 0) + 1
            picked[kind] = picked.get(kind, 0) + (ans.retrieved and ans.best == i)
    return {k: {"shown": n, "picked": round(picked[k] / n, 4)} for k, n in sorted(shown.items())}


def score_world(cases: Sequence[BranchCase], answers: Sequence[Answer]) -> tuple[float, float, float, list[dict]]:
    """(retrieval rate, branch choice, answer match, a few failures) of world-question answers."""
    retrieved = chosen = matched = 0
    failures = []
    for case, ans in zip(cases, answers, strict=True):
        hit = ans.retrieved and ans.best == case.gold_index
        match = case.question.gold.lower() in ans.answer.lower()
        retrieved += ans.retrieved
        chosen += hit
        matched += match
        if (not hit or not match) and len(failures) < 8:
            failures.append({"question": case.question.text, "gold": case.question.gold, "answer": ans.answer,
                             "retrieved": ans.retrieved, "gold_index": case.gold_index, "best": ans.best,
                             "finals": [round(b.final, 3) for b in ans.branches]})
    n = max(1, len(cases))
    return retrieved / n, chosen / n, matched / n, failures


def expected_answer(example: Example) -> str:
    """The answer text of a no-fact example, as post-processing leaves it."""
    return example.response.removeprefix("[No Retrieval]").rsplit("[Utility:", 1)[0]


def score_instructions(examples: Sequence[Example], answers: Sequence[Answer]) -> tuple[float, float, list[dict]]:
    """(retrieval rate, exact answers, a few failures) of no-fact instruction answers."""
    retrieved = exact = 0
    failures = []
    for ex, ans in zip(examples, answers, strict=True):
        good = ans.answer.strip() == expected_answer(ex)
        retrieved += ans.retrieved
        exact += good
        if (ans.retrieved or not good) and len(failures) < 8:
            failures.append({"instruction": ex.instruction, "expected": expected_answer(ex), "answer": ans.answer,
                             "retrieved": ans.retrieved, "gate": ans.retrieval_probability})
    n = max(1, len(examples))
    return retrieved / n, exact / n, failures


def evaluate(rag: SelfRAG, world: World, split: Split, num_world: int | None = None, num_instructions: int = 300,
             seed: int = 0, batch_size: int = 32) -> Evaluation:
    start = time.perf_counter()
    cases = world_cases(world, split, num_world, seed)
    answers = answer_all(rag, [c.question.text for c in cases], [_passages(c.passages) for c in cases], batch_size)
    ret_w, chosen, matched, fail_w = score_world(cases, answers)
    kinds = distractor_breakdown(world, cases, answers)
    by_phrasing = phrasing_breakdown(cases, answers)
    instr = instruction_cases(world, split, num_instructions, seed)
    answers = answer_all(rag, [ex.instruction for ex, _ in instr], [ps for _, ps in instr], batch_size)
    ret_i, exact, fail_i = score_instructions([ex for ex, _ in instr], answers)
    return Evaluation(len(cases), round(ret_w, 4), round(chosen, 4), round(matched, 4), len(instr), round(ret_i, 4),
                      round(exact, 4), round(time.perf_counter() - start, 1), kinds, by_phrasing, fail_w + fail_i)


def load_selfrag(path: Path, max_new_tokens: int = 48) -> SelfRAG:
    return SelfRAG(Engine.from_pretrained(path, device="cpu", progress=False), max_new_tokens=max_new_tokens)


def check_corpus(path: Path, world: World) -> None:
    """The checkpoint's corpus must be this world's passages, or the held-out split means nothing."""
    corpus = read_corpus(path)
    if [(p.id, p.title, p.text) for p in corpus] != [(p.id, p.title, p.text) for p in world.passages]:
        raise ValueError(f"{path / 'corpus.jsonl'} is not the passages of build_world({world.seed})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=None,
                        help="checkpoint directory (default: the committed tiny_selfrag)")
    parser.add_argument("--world-questions", type=int, default=None, help="default: every held-out question")
    parser.add_argument("--instructions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.checkpoint or default_checkpoint_dir()
    world, split = world_and_split()
    check_corpus(path, world)
    result = evaluate(load_selfrag(path), world, split, args.world_questions, args.instructions, args.seed)
    print(json.dumps(result.summary(), indent=2))
    for f in result.failures:
        print(json.dumps(f), file=sys.stderr)


if __name__ == "__main__":
    main()
