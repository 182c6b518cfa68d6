"""The embedded tiny Self-RAG model on the Triton kernels answers as the torch reference does, at the head size
its checkpoint has (read from its config; kernel tests cover other head sizes on random checkpoints).

On the CPU the kernels run in Triton's interpreter (slow: one question, two passages, short answers); on CUDA
they run compiled, in fp16, with graphs. The reference is the torch path of the same engine class, whose
logits test_model_parity checks against transformers.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import tiny_model_dir

MODEL = tiny_model_dir()

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")


def _question_and_passages():
    from selfrag_engine.tiny.evaluate import _passages, world_and_split, world_cases
    world, split = world_and_split()
    (case,) = world_cases(world, split, 1, seed=1)
    passages = _passages(case.passages)
    relevant = [p for p in passages if p.title in case.question.text][:1]
    other = [p for p in passages if p.title not in case.question.text][:1]
    assert relevant and other
    return case.question.text, relevant + other


def _checkpoint_head_dim() -> int:
    config = json.loads((MODEL / "config.json").read_text())
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _answer(device: str, use_kernels: bool, dtype=None):
    from selfrag_engine.engine.llm_engine import Engine
    from selfrag_engine.selfrag.short_form import SelfRAG
    question, passages = _question_and_passages()
    engine = Engine.from_pretrained(MODEL, device=device, dtype=dtype, use_kernels=use_kernels, progress=False,
                                    max_num_seqs=4, num_blocks=64)
    assert engine.config.head_dim == _checkpoint_head_dim()
    (answer,) = SelfRAG(engine, max_new_tokens=20).answer_batch([question], [passages], mode="adaptive")
    return engine, answer


def _assert_same_answer(fast, ref, tol):
    assert fast.retrieved == ref.retrieved
    assert fast.retrieval_probability == pytest.approx(ref.retrieval_probability, abs=tol)
    assert fast.best == ref.best and fast.answer == ref.answer
    assert [b.token_ids for b in fast.branches] == [b.token_ids for b in ref.branches]
    for f, r in zip(fast.branches, ref.branches):
        for name in ("relevance", "grounding", "utility", "final"):
            assert getattr(f, name) == pytest.approx(getattr(r, name), abs=tol), name


def test_tiny_model_on_interpreted_kernels_answers_as_torch():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in the Triton interpreter")
    torch.set_num_threads(2)
    _, ref = _answer("cpu", use_kernels=False)
    engine, fast = _answer("cpu", use_kernels=True)
    assert engine.runner.backend.name == "triton-interpreted"
    assert ref.retrieved and ref.answer  # the question is one the model answers from the relevant passage
    _assert_same_answer(fast, ref, 1e-4)


@pytest.mark.gpu
def test_tiny_model_on_compiled_kernels_answers_as_torch():
    _, ref = _answer("cuda", use_kernels=False, dtype=torch.float32)
    engine, fast = _answer("cuda", use_kernels=True, dtype=torch.float32)
    assert engine.runner.backend.name == "triton"
    _assert_same_answer(fast, ref, 1e-3)
