"""Self-RAG formulas against hand-computed values (paper, Appendix A.3, and the reference scripts' reads)."""
import math
import random

import pytest
import torch

from selfrag_engine.layers.sampler import ReflectionGroups
from selfrag_engine.errors import RequestError
from selfrag_engine.selfrag.critique import Decoded, Reader, critique
from selfrag_engine.selfrag.prompts import format_passage, format_prompt, postprocess
from selfrag_engine.selfrag.scoring import (ScoringConfig, final_score, grounding_score, normalize_compat,
                                            relevance_score, retrieval_gate, segment_gate, sequence_score,
                                            truncated_values, utility_score)


def test_prompt_formats():
    assert format_prompt("Who?") == "### Instruction:\nWho?\n\n### Response:\n"
    assert format_prompt("Q", "ctx") == "### Instruction:\nQ\n\n### Input:\nctx\n\n### Response:\n"
    assert format_passage("T", "body") == "[Retrieval]<paragraph>T\nbody</paragraph>"
    with pytest.raises(ValueError, match="empty"):
        format_prompt("  ")


def test_postprocess():
    raw = " [Relevant]Paris is the capital.[Fully supported][Utility:5]</s>"
    assert postprocess(raw) == "Paris is the capital."
    assert postprocess("[Continue to Use Evidence]x") == "[Continue to Use Evidence]x"
    assert postprocess("One.Two![No Retrieval]Three", long_form=True) == "One. Two! Three"


def test_gate():
    assert retrieval_gate(0.3, 0.1) == pytest.approx(0.75)
    assert retrieval_gate(0.0, 0.0) == 0.0
    # The reference divides log-probabilities: p(Ret)=0.01, p(NoRet)=0.9 gives a high value.
    lp = retrieval_gate(math.log(0.01), math.log(0.9), gate="logprob")
    assert lp == pytest.approx(math.log(0.01) / (math.log(0.01) + math.log(0.9)))
    assert lp > 0.9


def test_scores_by_hand():
    assert relevance_score(0.6, 0.2) == pytest.approx(0.75)
    assert grounding_score(0.5, 0.2, 0.3) == pytest.approx((0.5 + 0.1) / 1.0)
    assert grounding_score(0.1, 0.1, 0.0) == pytest.approx(0.75)
    assert utility_score([0.1, 0.1, 0.2, 0.2, 0.4]) == pytest.approx(-0.1 - 0.05 + 0 + 0.1 + 0.4)
    assert utility_score([0, 0, 0, 0, 2.0]) == pytest.approx(1.0)
    assert sequence_score(-2.0, 4) == pytest.approx(math.exp(-0.5))
    cfg = ScoringConfig()
    assert final_score(0.75, 0.6, 0.4, 0.9, cfg) == pytest.approx(0.75 + 0.6 + 0.2)
    assert final_score(0.75, 0.6, 0.4, 0.9, ScoringConfig(use_seqscore=True)) == pytest.approx(0.9 + 1.55)
    with pytest.raises(ValueError):
        utility_score([0.5, 0.5])
    with pytest.raises(ValueError):
        ScoringConfig(gate="other")


def test_segment_gate_and_truncated_reads_by_hand():
    assert segment_gate(0.2, 0.5, 0.1) == pytest.approx(0.3 / 0.7)
    assert segment_gate(0.0, 0.0, 0.4) == 0.0
    lps = [math.log(0.3), math.log(0.01), math.log(0.5)]
    assert truncated_values(lps, [True, False, True]) == pytest.approx([0.3, math.exp(-100), 0.5])
    assert truncated_values(lps, [True, False, True], "raw") == pytest.approx([0.3, -100.0, 0.5])
    # The long-form script's raw -100 makes the relevance ratio negative, and it stands.
    assert relevance_score(0.3, -100.0) == pytest.approx(0.3 / -99.7)
    assert relevance_score(math.exp(-100), math.exp(-100)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        truncated_values(lps, [True])


def test_scoring_config_validation_and_compat_names():
    for bad in (dict(threshold=float("nan")), dict(w_use="1"), dict(top_logprobs=0), dict(top_logprobs=True),
                dict(missing_relevance="zero"), dict(utility_group="relevance"), dict(use_seqscore=1)):
        with pytest.raises(ValueError):
            ScoringConfig(**bad)
    assert ScoringConfig(threshold=None).threshold is None
    assert normalize_compat("official") == normalize_compat("released") == "released"
    with pytest.raises(RequestError, match="compat"):
        normalize_compat("reference")


def _decoded(rng, steps, vocab=40):
    """A crafted decode: random logits per step over a small vocabulary whose last 13 ids are reflection tokens,
    with what the sampler would report (group probabilities, full-vocabulary log-probabilities, top-20)."""
    base = vocab - 13
    groups = ReflectionGroups.from_token_ids({"retrieval": (base, base + 1, base + 2),
                                              "relevance": (base + 3, base + 4),
                                              "grounding": (base + 5, base + 6, base + 7),
                                              "utility": tuple(range(base + 8, base + 13))})
    logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(rng.randrange(10 ** 6))) * 3
    lp = torch.log_softmax(logits.double(), -1)
    tokens = [rng.randrange(base) for _ in range(steps)]
    flat = list(groups.flat_ids)
    probs = torch.zeros(steps, len(flat), dtype=torch.float64)
    for name in groups.names:
        s = groups.span(name)
        probs[:, s] = torch.softmax(logits.double()[:, flat[s]], -1)
    top = []
    for i, t in enumerate(tokens):
        order = torch.argsort(logits[i], descending=True)[:20].tolist()
        row = {int(j): float(lp[i, j]) for j in order}
        row[t] = float(lp[i, t])  # as the engine reports it: the top-k in rank order, then the generated token
        top.append(row)
    d = Decoded([1, 5, 7], tokens, [float(lp[i, t]) for i, t in enumerate(tokens)], probs, lp[:, flat], top, groups)
    return d, logits, lp, groups


def test_critique_reads_by_hand():
    rng = random.Random(108)
    d, logits, lp, groups = _decoded(rng, 6)
    ids = dict(zip(groups.names, groups.ids))
    g_at, u_at = rng.randrange(1, 3), rng.randrange(3, 6)
    d.token_ids[g_at] = ids["grounding"][rng.randrange(3)]
    d.token_ids[u_at] = ids["utility"][rng.randrange(5)]
    p = torch.softmax(logits.double(), -1)
    rel = p[0, ids["relevance"][0]] / (p[0, ids["relevance"][0]] + p[0, ids["relevance"][1]])
    g = p[g_at, list(ids["grounding"])]
    u = p[u_at, list(ids["utility"])]
    util = sum(w * x for w, x in zip((-1, -0.5, 0, 0.5, 1), u)) / u.sum()
    seq = math.exp(sum(d.token_logprobs) / 6)
    c = critique(d, Reader(ScoringConfig(use_seqscore=True, w_use=0.7)), ids)
    assert (c.relevance, c.grounding, c.utility, c.seq_score) == pytest.approx(
        (float(rel), float((g[0] + 0.5 * g[1]) / g.sum()), float(util), seq), rel=1e-6)
    assert c.final == pytest.approx(float(rel + (g[0] + 0.5 * g[1]) / g.sum() + 0.7 * util) + seq, rel=1e-6)
    assert c.steps == {"relevance": 0, "grounding": g_at, "utility": u_at}
    # The long-form script's slip: the grounding ids read at the utility position, and a utility of 0.
    c = critique(d, Reader(ScoringConfig(utility_group="grounding")), ids)
    assert c.utility == 0.0 and list(c.probs["utility"]) == ["[Fully supported]", "[Partially supported]",
                                                             "[No support / Contradictory]"]


def test_top_n_presence_by_hand():
    """Whether a reflection token is in the top n: generated token, sampler top-20, the p >= 1/n bound, and
    the exact rank from a scoring pass (only when the others cannot tell), against ranks counted here."""
    rng = random.Random(134)
    d, logits, lp, groups = _decoded(rng, 4)
    calls = []

    def score_fn(ids):
        calls.append(list(ids))
        rows = torch.zeros(len(ids), logits.shape[1], dtype=torch.float64)
        rows[len(d.context_ids) - 1:] = logits[:len(ids) - len(d.context_ids) + 1].double()
        return rows

    for n in (rng.randint(1, 5), rng.randint(21, 30), 10 ** 6):
        reader = Reader(ScoringConfig(top_logprobs=n), vocab=logits.shape[1], score_fn=score_fn)
        for step in range(4):
            for t in groups.flat_ids:
                rank = int((logits[step] > logits[step, t]).sum())
                expect = rank < n or t == d.token_ids[step]
                assert reader.present(d, step, t, float(lp[step, t])) == expect, (n, step, t, rank)
    assert calls and all(c == d.context_ids + d.token_ids[:-1] for c in calls)
    d.token_ids[0] = groups.ids[1][0]  # the generated token always counts, whatever its rank
    assert Reader(ScoringConfig(top_logprobs=1), vocab=40, score_fn=score_fn).present(d, 0, groups.ids[1][0], -50.0)
