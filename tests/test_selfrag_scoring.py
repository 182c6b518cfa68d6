"""Self-RAG formulas against hand-computed values (paper, Appendix A.3)."""
import math

import pytest

from selfrag_engine.selfrag.prompts import format_passage, format_prompt, postprocess
from selfrag_engine.selfrag.scoring import (ScoringConfig, final_score, grounding_score, relevance_score,
                                            retrieval_gate, sequence_score, utility_score)


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
