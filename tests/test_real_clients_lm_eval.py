"""lm-eval (EleutherAI's harness), a client nobody here wrote, scores the embedded model through
`selfrag-engine serve` with its `local-completions` model, and the same tasks through its own transformers backend
(`hf`) on the same checkpoint: the two must agree. The tasks are local (tests/lm_eval_tasks: a YAML each and a
jsonl of documents, no dataset hub): a multiple-choice task scored by loglikelihood (prompt logprobs through
`echo`), a perplexity task (loglikelihood_rolling, the same requests over whole passages) and a generate_until task, both about facts of the model's world that training held out, read from the
passage in the prompt.

Both backends get `add_bos_token=True` (the model was trained with BOS; lm-eval's API models default to False,
its hf model to the tokenizer's setting) so both score the same token ids. lm-eval's API model tokenizes with the
checkpoint's Hugging Face tokenizer and sends token ids, as it does by default."""
from __future__ import annotations

from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (requirements-clients.txt)")
pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate (requirements-clients.txt)")

from tests.server_process import MODEL, NAME, serve  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
MC, GEN, PPL = "tiny_world_mc", "tiny_world_gen", "tiny_world_ppl"
# Loglikelihoods of the same token ids from the engine's float32 CPU forward and transformers' (sums over ~10
# tokens).
LOGLIK_TOL = 1e-3


@pytest.fixture(scope="module")
def offline():
    """No hub: the tasks' documents, the checkpoint and its tokenizer are all local."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="module")
def server(offline):
    with serve() as s:
        yield s


def evaluate(model: str, model_args: dict, tasks: list[str], **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    # Only the local tasks: indexing lm-eval's thousands of built-in task files takes a minute on a loaded CPU.
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                   random_seed=0,
                                   numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, **kwargs)


def through_server(server, tasks: list[str]) -> dict:
    # max_retries=1: one attempt, so a refused request fails the test at once.
    return evaluate("local-completions", {"model": NAME, "base_url": f"{server.base}/v1/completions",
                                          "tokenizer": str(MODEL), "add_bos_token": True, "max_retries": 1},
                    tasks)


@pytest.fixture(scope="module")
def transformers_backend(offline) -> dict:
    return evaluate("hf", {"pretrained": str(MODEL), "dtype": "float32", "device": "cpu", "add_bos_token": True},
                    [MC, GEN, PPL], batch_size=8)


def by_doc(results: dict, task: str) -> dict[str, dict]:
    return {s["doc"]["id"]: s for s in results["samples"][task]}


def test_generate_until_equals_the_transformers_backend(server, transformers_backend):
    served = through_server(server, [GEN])
    ours, theirs = by_doc(served, GEN), by_doc(transformers_backend, GEN)
    assert ours.keys() == theirs.keys() and len(ours) >= 4
    for doc_id, sample in ours.items():
        # The server's text keeps the first word's SentencePiece space, as vLLM's incremental detokenizer does;
        # transformers' decode of the generated ids alone drops it.
        [[text]], [[ref]] = sample["resps"], theirs[doc_id]["resps"]
        assert text.lstrip() == ref, doc_id
        assert sample["filtered_resps"] == theirs[doc_id]["filtered_resps"], doc_id
    score = served["results"][GEN]["exact_match,strip"]
    assert score == transformers_backend["results"][GEN]["exact_match,strip"]
    assert score == 1.0  # the model reads each answer from the passage in its prompt


def test_multiple_choice_score_equals_the_transformers_backend(server, transformers_backend):
    served = through_server(server, [MC])
    ours, theirs = by_doc(served, MC), by_doc(transformers_backend, MC)
    assert ours.keys() == theirs.keys() and len(ours) >= 6
    for doc_id, sample in ours.items():
        got, want = sample["filtered_resps"], theirs[doc_id]["filtered_resps"]
        assert len(got) == len(want) == len(sample["doc"]["choices"]), doc_id
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, want):
            assert ll == pytest.approx(ref_ll, abs=LOGLIK_TOL), doc_id
            assert greedy == ref_greedy, doc_id
    score = served["results"][MC]["acc,none"]
    assert score == transformers_backend["results"][MC]["acc,none"]
    assert score == 1.0  # the passage states the answer; the distractors are values it does not mention


def test_perplexity_equals_the_transformers_backend(server, transformers_backend):
    served = through_server(server, [PPL])
    ours, theirs = by_doc(served, PPL), by_doc(transformers_backend, PPL)
    assert ours.keys() == theirs.keys() and len(ours) >= 4
    for doc_id, sample in ours.items():
        [ll], [ref] = sample["filtered_resps"], theirs[doc_id]["filtered_resps"]
        assert ll == pytest.approx(ref, abs=LOGLIK_TOL), doc_id
        assert ll < 0
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert served["results"][PPL][metric] == pytest.approx(transformers_backend["results"][PPL][metric],
                                                              rel=1e-4), metric
