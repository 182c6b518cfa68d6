"""Behaviour of the committed tiny Self-RAG model through the whole engine.

The model (`selfrag_engine/data/tiny_selfrag`, see its MODEL_CARD.md) learned the Self-RAG protocol on the
synthetic world. Every layer takes part here: the SentencePiece tokenizer with the added tokens, the paged
cache and the branches forked off one prompt, the attention (the kernels on CUDA), the sampler's reflection
probabilities and the critique scores. A regression in any of them shows up as a drop in these rates, which
the bounds (the issue's targets, below what the model measures here and on the full held-out set) catch.

Questions are about held-out entities the training never saw, each with K=5 passages given explicitly: the
relevant one and the four non-relevant passages a lexical retriever ranks highest for the question.
"""
from __future__ import annotations

import json

import pytest
import torch

from selfrag_engine.tiny.assets import CORPUS_FILE
from selfrag_engine.tiny.evaluate import (
    _passages, answer_all, instruction_cases, phrasing_breakdown, score_instructions, score_world, world_and_split,
    world_cases,
)
from tests.helpers import GPU_KV_CACHE_BYTES, tiny_model_dir

MODEL = tiny_model_dir()  # $SELFRAG_TINY_MODEL judges a candidate checkpoint instead
NUM_QUESTIONS = 96
NUM_INSTRUCTIONS = 64
# Measured on these fixed samples (greedy decoding, so the same on every run up to float rounding): world
# retrieval 1.0 (96 of 96), branch choice 1.0, answer match 0.990 (95 of 96); no-fact retrieval 0.0, exact
# answers 0.25 (16 of 64). The bounds are the targets the first model card set, which the model meets on the
# full held-out set (see MODEL_CARD.md): a broken layer drives the gates, the relevance tokens or the copying
# towards chance.
WORLD_RETRIEVAL_BOUND = 0.95
INSTRUCTION_RETRIEVAL_BOUND = 0.05
BRANCH_BOUND = 0.90
MATCH_BOUND = 0.90
EXACT_BOUND = 0.10

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def rag(request):
    """On the CPU the torch reference path; on CUDA (fp16) the kernels, CUDA graphs and overlapped steps."""
    from selfrag_engine.engine.llm_engine import Engine
    from selfrag_engine.selfrag.short_form import SelfRAG

    torch.set_num_threads(2)
    dtype = torch.float16 if request.param == "cuda" else None
    return SelfRAG(Engine.from_pretrained(MODEL, device=request.param, dtype=dtype, progress=False,
                                          kv_cache_bytes=GPU_KV_CACHE_BYTES),
                   max_new_tokens=40)


@pytest.fixture(scope="module")
def world_split():
    return world_and_split()


def test_corpus_is_the_worlds_passages(world_split):
    world, _ = world_split
    lines = (MODEL / CORPUS_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["id"], r["title"], r["text"]) for r in records] == [(p.id, p.title, p.text) for p in world.passages]


def test_world_questions_retrieve_pick_the_relevant_branch_and_answer(rag, world_split):
    world, split = world_split
    # A sample the card's full evaluation also covers, drawn with a seed of its own.
    cases = world_cases(world, split, NUM_QUESTIONS, seed=1)
    assert len(cases) == NUM_QUESTIONS
    answers = answer_all(rag, [c.question.text for c in cases], [_passages(c.passages) for c in cases], 32)
    retrieval, branch, match, failures = score_world(cases, answers)
    assert retrieval >= WORLD_RETRIEVAL_BOUND, failures
    assert branch >= BRANCH_BOUND, failures
    assert match >= MATCH_BOUND, failures
    # The card's split by wording adds up to the whole, and the sample holds both wordings.
    parts = phrasing_breakdown(cases, answers)
    assert set(parts) == {"trained", "held_out"}
    assert sum(p["questions"] for p in parts.values()) == len(cases)
    for key, whole in (("retrieval_rate", retrieval), ("branch_choice", branch), ("answer_match", match)):
        assert sum(p[key] * p["questions"] for p in parts.values()) / len(cases) == pytest.approx(whole, abs=1e-3)
    # The branch texts are answers, not the passage echoed back or reflection tokens left in.
    for ans in answers[:8]:
        assert ans.answer and "[" not in ans.answer and "<paragraph>" not in ans.answer


def test_no_fact_instructions_answer_without_retrieval(rag, world_split):
    world, split = world_split
    cases = instruction_cases(world, split, NUM_INSTRUCTIONS, seed=1)
    answers = answer_all(rag, [ex.instruction for ex, _ in cases], [ps for _, ps in cases], 32)
    retrieval, exact, failures = score_instructions([ex for ex, _ in cases], answers)
    assert retrieval <= INSTRUCTION_RETRIEVAL_BOUND, failures
    assert exact >= EXACT_BOUND, failures
