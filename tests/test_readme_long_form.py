"""The README's long-form example runs as written, from another directory as a user pastes it, on the embedded
model, and prints what it says it prints. On a model trained for the long form its answer is judged by the
evaluation's judges: written in two segments or more, each segment stating a fact cites a passage of the asked
person that states it, every fact it states is right.

With `SELFRAG_TINY_MODEL=DIR` the example runs on the checkpoint in DIR instead of `"tiny"` (the only change made
to its text).
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from selfrag_engine.tiny.assets import TRAINING_FILE, default_model_dir, trained_for_long_form
from selfrag_engine.tiny.evaluate import answer_segments, segment_citations, stated_facts, world_and_split
from tests.helpers import tiny_model_dir

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Self-RAG long form and the two flavours"
MODEL = tiny_model_dir()

pytest.importorskip("faiss", reason="the example builds a faiss index (the retrieval extra)")


def readme_example() -> str:
    """The first Python block under the long-form heading."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
    assert found, f"no Python example under {HEADING!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[str, dict, list[str]]:
    """(the example's code, its variables after running, the lines it printed)."""
    code = readme_example()
    if MODEL != default_model_dir():
        assert code.count('Engine.from_pretrained("tiny")') == 1
        code = code.replace('Engine.from_pretrained("tiny")', f"Engine.from_pretrained({str(MODEL)!r})")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.chdir(tmp_path_factory.mktemp("elsewhere")), contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    return code, namespace, printed.getvalue().splitlines()


def test_the_readme_long_form_example_runs_as_written(ran):
    _, namespace, lines = ran
    ans = namespace["ans"]
    assert ans.segments and len(ans.citations) == len(ans.segments)
    # What its two prints say: the answer and score, then one line per segment of the chosen path.
    assert lines[0] == f"{ans.answer} {ans.score}"
    assert lines[1:] == [" ".join(map(str, (seg.depth, doc.title if doc else None, seg.final, seg.text)))
                         for seg, doc in zip(ans.segments, ans.citations)]


@pytest.mark.skipif(not trained_for_long_form(MODEL),
                    reason=f"{MODEL.name} was not trained for the long form: its training record ({TRAINING_FILE}) "
                           "is missing or shows no long-form requests in its data")
def test_the_readme_long_form_example_answers_in_cited_correct_segments(ran):
    code, namespace, _ = ran
    ans = namespace["ans"]
    world, _ = world_and_split()
    (entity,) = [e for e in world.entities if e.kind == "person" and e.name in ans.question]
    segments = answer_segments(ans.segments)
    verdicts = segment_citations(world, entity, segments)
    facts = stated_facts(world, entity, ans.answer)
    report = (ans.answer, [(s.text, s.passage.id if s.passage else None) for s in segments], verdicts)
    assert ans.score is not None and len(segments) >= 2, report
    assert True in verdicts and False not in verdicts, report
    assert facts and all(f.correct for f in facts), report
