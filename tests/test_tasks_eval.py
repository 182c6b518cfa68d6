"""Task presets, eval-file readers, metrics and the `selfrag-engine eval` command, end to end on a tiny
checkpoint against Self-RAG run directly on hand-written prompts."""
import importlib.util
import json
import random
import string

import pytest

from selfrag_engine.entrypoints.cli import main
from selfrag_engine.selfrag.evaluate import (arc_accuracy, match, metrics_path, pubhealth_accuracy,
                                             reference_match, str_em)
from selfrag_engine.selfrag.tasks import (PRESETS, DatasetError, arc_letter, get_preset, load_records,
                                          normalize_answer, postprocess_prediction, pubhealth_label, read_examples)
from tests.helpers import tiny_checkpoint

CKPT = dict(seed=31, num_key_value_heads=2)


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n))


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- presets and prompts ----------------------------------------------------------------------------


def test_presets_follow_the_reference_commands():
    expect = {  # (form, ndocs, max_new_tokens, threshold, closed_set, headline metric)
        "popqa": ("short", 10, 100, 0.2, False, "match"), "triviaqa": ("short", 10, 100, 0.2, False, "match"),
        "pubhealth": ("short", 5, 50, 0.2, True, "accuracy"),
        "arc_challenge": ("short", 5, 50, 0.2, True, "accuracy"),
        "asqa": ("long", 5, 300, 0.0, False, "str_em"), "bio": ("long", 5, 300, 0.2, False, None),
    }
    assert set(PRESETS) == set(expect)
    for name, (form, ndocs, mnt, thr, closed, metric) in expect.items():
        p = get_preset(name)
        assert (p.form, p.ndocs, p.max_new_tokens, p.threshold, p.closed_set, p.primary_metric) == \
            (form, ndocs, mnt, thr, closed, metric)
    assert (PRESETS["asqa"].beam_width, PRESETS["asqa"].max_depth) == (2, 7)
    with pytest.raises(ValueError, match="unknown task 'fever'"):
        get_preset("fever")


def test_prompts_match_the_reference_strings(tmp_path):
    rng = random.Random(50)
    claim, q, q2 = _words(rng, 6), _words(rng, 5) + "?", _words(rng, 4) + "?"
    texts = [_words(rng, 2) for _ in range(4)]
    path = _write_jsonl(tmp_path / "ph.jsonl", [{"claim": claim, "answers": ["false"]}])
    ex = read_examples(path, PRESETS["pubhealth"])[0]
    assert ex.instruction == ("Is the following statement correct or not? Say true if it's correct; otherwise say "
                              "false.\n\n## Input:\n\n" + claim)
    # Numeric labels 1..4 stand for A..D; a three-choice question still lists an empty D.
    rows = [{"question": q, "choices": {"text": texts, "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
            {"question": q2, "choices": {"text": texts[:3], "label": ["1", "2", "3"]}, "answerKey": "2"}]
    a, b = read_examples(_write_jsonl(tmp_path / "arc.jsonl", rows), PRESETS["arc_challenge"])
    head = "Given four answer candidates, A, B, C and D, choose the best answer choice.\n\n### Input:\n"
    assert a.instruction == head + q + f"\nA: {texts[0]}\nB: {texts[1]}\nC: {texts[2]}\nD: {texts[3]}"
    assert b.instruction == head + q2 + f"\nA: {texts[0]}\nB: {texts[1]}\nC: {texts[2]}\nD: "
    assert (a.golds, b.golds) == (["C"], ["B"])
    ex = read_examples(_write_jsonl(tmp_path / "pq.jsonl", [{"question": q, "answers": ["x"]}]), PRESETS["popqa"])[0]
    assert ex.instruction == q and ex.passages is None
    ex = read_examples(_write_jsonl(tmp_path / "asqa.jsonl", [{"question": q, "answer": "y"}]), PRESETS["asqa"])[0]
    assert ex.instruction == ("Answer the following question. The question may be ambiguous and have multiple "
                              "correct answers, and in that case, you have to provide a long-form answer including "
                              "all correct answers.## Input:\n\n" + q)
    bio = [{"input": "Question: Tell me a bio of Ann Lee.", "topic": "Ann Lee"}, {"topic": "Bo Chan"}]
    a, b = read_examples(_write_jsonl(tmp_path / "bio.jsonl", bio), PRESETS["bio"])
    assert a.instruction == "Question: Tell me a bio of Ann Lee." and b.instruction == "Tell me a bio of Bo Chan."
    assert a.extra == {"topic": "Ann Lee"}


# ---- readers ----------------------------------------------------------------------------------------


def test_readers_accept_field_variants(tmp_path):
    rng = random.Random(81)
    golds = [_words(rng, 2) for _ in range(3)]
    ctxs = [{"title": _words(rng, 1), "text": _words(rng, 8), "id": i} for i in range(4)]
    rows = [{"question": "q1", "answers": golds, "ctxs": ctxs},
            {"question": "q2", "answer": golds[0], "docs": ctxs[:2]},
            {"instruction": "q3", "golds": golds[1:], "top_contexts": [{"text": "no title"}], "id": 7},
            {"query": "q4", "output": [golds[2]]}]
    exs = read_examples(_write_jsonl(tmp_path / "qa.jsonl", rows), PRESETS["triviaqa"])
    assert [e.question for e in exs] == ["q1", "q2", "q3", "q4"]
    assert [e.golds for e in exs] == [golds, golds[:1], golds[1:], golds[2:]]
    assert [(p.title, p.text, p.id) for p in exs[0].passages] == [(c["title"], c["text"], str(c["id"])) for c in ctxs]
    assert len(exs[1].passages) == 2 and exs[2].passages[0].title == "" and exs[3].passages is None
    assert exs[2].id == "7" and [e.index for e in exs] == [0, 1, 2, 3] and exs[3].line == 4
    # SUPPORTS / REFUTES golds are read as true / false; a JSON file may hold a list or {"data": [...]}.
    (tmp_path / "ph.json").write_text(json.dumps({"data": [{"question": "c", "answers": ["SUPPORTS"]}]}))
    assert read_examples(tmp_path / "ph.json", PRESETS["pubhealth"])[0].golds == ["SUPPORTS"]
    assert len(read_examples(_write_jsonl(tmp_path / "lim.jsonl", rows), PRESETS["popqa"], limit=2)) == 2


@pytest.mark.parametrize("task,row,message", [
    ("popqa", {"answers": ["a"]}, r"bad\.jsonl:2: no question \(expected one of the fields 'question'"),
    ("popqa", {"question": "q"}, r"bad\.jsonl:2: no gold answers \(expected one of the fields 'answers', 'answer'"),
    ("popqa", {"question": "  ", "answers": ["a"]}, r":2: the question must be a non-empty string"),
    ("popqa", {"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}, r":2: passage 0 of 'ctxs' has no 'text'"),
    ("popqa", {"question": "q", "answers": ["a"], "ctxs": "text"}, r":2: 'ctxs' must be a list"),
    ("pubhealth", {"claim": "c", "answers": ["mixture"]}, r":2: the gold label must be true or false"),
    ("arc_challenge", {"question": "q", "answerKey": "A"}, r":2: no answer choices \(expected one of the fields "
                                                           r"'choices'\)"),
    ("arc_challenge", {"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "D"},
     r":2: answer key 'D' is not one of the choices"),
    ("arc_challenge", {"question": "q", "choices": {"text": ["x"], "label": ["A", "B"]}, "answerKey": "A"},
     r":2: 'choices' must be"),
    ("bio", {"cat": ["rare"]}, r":2: no input"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, task, row, message):
    good = {"popqa": {"question": "q", "answers": ["a"]}, "pubhealth": {"claim": "c", "answers": ["true"]},
            "arc_challenge": {"question": "q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "A"},
            "bio": {"topic": "T"}}[task]
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DatasetError, match=message):
        read_examples(path, PRESETS[task])


def test_malformed_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "q", "answers": ["a"]}\n\n{"question": \n')
    with pytest.raises(DatasetError, match=r"a\.jsonl:3: not valid JSON"):
        load_records(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('["q"]\n')
    with pytest.raises(DatasetError, match=r"b\.jsonl:1: expected a JSON object, got list"):
        load_records(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_records(tmp_path / "c.jsonl")
    with pytest.raises(DatasetError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


# ---- metrics ----------------------------------------------------------------------------------------


def test_match_is_containment_as_written():
    rng = random.Random(142)
    for _ in range(50):
        gold = _words(rng, rng.randint(1, 3))
        before, after = _words(rng, rng.randint(0, 4)), _words(rng, rng.randint(0, 4))
        others = [_words(rng, 2) + "Q" for _ in range(rng.randint(0, 3))]  # never inside lower-case text
        golds = others + [gold]
        rng.shuffle(golds)
        assert match(f"{before} {gold} {after}", golds) == 1.0
        assert match(f"{before} {after}", others) == 0.0
        # The reference compares raw strings: a case change is a miss.
        assert match(f"{before} {gold.upper()} {after}", [gold]) == 0.0
    assert match("Paris is the capital", ["Lyon", "Paris"]) == 1.0 and match("", ["a"]) == 0.0
    assert reference_match("The claim SUPPORTS it", ["true"]) == 1.0
    assert reference_match("REFUTES", ["false"]) == 1.0 and reference_match("REFUTES", ["true"]) == 0.0


def test_closed_set_normalization():
    cases = [("true", "true"), ("False", "false"), (" true.", "true"), ("It is false, not true", "false"),
             ("SUPPORTS", "true"), ("REFUTES", "false"), ("untrue", None), ("maybe", None)]
    for text, label in cases:
        assert pubhealth_label(text) == label, text
    assert pubhealth_accuracy("True", ["true"]) == 1.0 and pubhealth_accuracy("true", ["REFUTES"]) == 0.0
    assert pubhealth_accuracy("false", ["REFUTES"]) == 1.0 and pubhealth_accuracy("", ["false"]) == 0.0
    choices = {"A": "the Moon", "B": "a volcano", "C": "Mars", "D": "water vapor"}
    for text, letter in [("B", "B"), ("C: Mars", "C"), ("(D) water vapor", "D"), ("A.", "A"), ("Mars", "C"),
                         ("It is a volcano.", "B"), ("The answer is D", "D"), ("B because", "B"),
                         ("A rock", "A"), ("none", None), ("", None)]:
        assert arc_letter(text, choices) == letter, text
    assert arc_accuracy("C: Mars", "C", choices) == 1.0 and arc_accuracy("Mars", "A", choices) == 0.0


def test_str_em_and_postprocessing():
    pairs = [["Barack Obama", "Obama"], ["1961"], ["Honolulu, Hawaii", "Hawaii"]]
    assert str_em("He was born in 1961 in hawaii.", pairs) == pytest.approx(2 / 3)
    assert str_em("The obama family.", pairs) == pytest.approx(1 / 3)
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert postprocess_prediction(PRESETS["popqa"], ":Paris") == "Paris"
    assert postprocess_prediction(PRESETS["pubhealth"], "#true\n") == "true"
    assert postprocess_prediction(PRESETS["popqa"], "a\nb") == "a\nb"
    assert metrics_path("out/preds.jsonl").as_posix() == "out/preds.metrics.json"


# ---- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from selfrag_engine import Engine
    return Engine.from_pretrained(tiny_checkpoint(**CKPT), progress=False)


def _direct(engine, instructions, passages, closed, mode="adaptive", threshold=0.2, max_new_tokens=8, ndocs=5):
    """Self-RAG run straight on the instructions, with the paper weights and the sequence score."""
    from selfrag_engine.selfrag.scoring import ScoringConfig
    from selfrag_engine.selfrag.short_form import SelfRAG
    scoring = ScoringConfig(threshold=threshold, w_rel=1.0, w_sup=1.0, w_use=0.5, use_seqscore=True)
    rag = SelfRAG(engine, scoring=scoring, ndocs=ndocs, max_new_tokens=max_new_tokens, mode=mode)
    return rag.answer_batch(instructions, passages, closed_set=closed)


def _cleaned(answer: str, closed: bool) -> str:
    """The reference's clean-up of a short-form answer: closed sets drop newlines, then one leading # or :."""
    if closed:
        answer = answer.replace("\n", "")
    return answer[1:] if answer[:1] in ("#", ":") else answer


def _read_outputs(out):
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, json.loads(metrics_path(out).read_text())


def test_eval_popqa_end_to_end(engine, tmp_path, capsys):
    from selfrag_engine.selfrag.short_form import Passage
    rng = random.Random(216)
    n, ndocs = 5, 3
    questions = [f"Who founded Town {rng.randint(0, 99)} in {rng.randint(1700, 1900)}?" for _ in range(n)]
    ctxs = [[{"title": f"Entity {rng.randint(0, 50)}", "text": _words(rng, rng.randint(4, 12))}
             for _ in range(ndocs + 2)] for _ in range(n)]
    passages = [[Passage(c["title"], c["text"]) for c in cs[:ndocs]] for cs in ctxs]
    gates = [a.retrieval_probability for a in _direct(engine, questions, passages, False, mode="adaptive",
                                                      max_new_tokens=1, ndocs=ndocs)]
    order = sorted(gates)
    threshold = (order[1] + order[2]) / 2  # some rows retrieve, some do not
    direct = _direct(engine, questions, passages, False, threshold=threshold, ndocs=ndocs)
    # Gold answers: a piece of the expected prediction for rows 0, 2, 4, strings it lacks for the others.
    golds = []
    for i, a in enumerate(direct):
        hit = a.answer[2:5] if i % 2 == 0 and len(a.answer) >= 5 else None
        golds.append(["@@" + _words(rng, 1)] + ([hit] if hit else []))
    assert any(len(g) == 2 for g in golds)
    rows = [{"question": q, "answers": g, "ctxs": c} for q, g, c in zip(questions, golds, ctxs)]
    rows[1] = {"question": questions[1], "answer": golds[1][0], "ctxs": ctxs[1]}  # field variant
    path = _write_jsonl(tmp_path / "popqa.jsonl", rows)
    out = tmp_path / "out" / "popqa.preds.jsonl"
    rc = main(["eval", "--task", "popqa", "--input", path, "--model", str(tiny_checkpoint(**CKPT)),
               "--output", str(out), "--max-new-tokens", "8", "--ndocs", str(ndocs), "--threshold", str(threshold),
               "--batch-size", "2", "--quiet"])
    assert rc == 0
    assert "match" in capsys.readouterr().out
    records, metrics = _read_outputs(out)
    assert len(records) == n
    for rec, a, q, g in zip(records, direct, questions, golds):
        assert rec["question"] == q and rec["prediction"] == _cleaned(a.answer, closed=False)
        assert rec["retrieved"] == a.retrieved and rec["gold"] == g
        assert rec["metrics"]["match"] == (1.0 if any(x in rec["prediction"] for x in g) else 0.0)
        trace = rec["trace"]
        assert rec["retrieved"] == (trace["retrieval_probability"] > threshold) == bool(trace["branches"])
        assert len(trace["branches"]) in (0, ndocs) and trace["retrieval_probability"] == pytest.approx(
            a.retrieval_probability, abs=1e-6)
    retrieved = [r["retrieved"] for r in records]
    assert 0 < sum(retrieved) < n
    assert metrics["retrieval_frequency"] == pytest.approx(sum(retrieved) / n)
    assert metrics["metrics"]["match"] == pytest.approx(sum(r["metrics"]["match"] for r in records) / n)
    for key in ("num_examples", "primary_metric", "num_generated_tokens", "seconds", "tokens_per_second",
                "questions_per_second", "settings"):
        assert key in metrics
    assert 0.0 <= metrics["metrics"]["match"] <= 1.0 and 0.0 <= metrics["retrieval_frequency"] <= 1.0
    assert metrics["num_generated_tokens"] == sum(a.num_generated_tokens for a in direct)
    assert metrics["tokens_per_second"] > 0 and metrics["questions_per_second"] > 0
    assert metrics["settings"]["ndocs"] == ndocs and metrics["settings"]["threshold"] == pytest.approx(threshold)


def test_eval_arc_end_to_end(engine, tmp_path):
    from selfrag_engine.selfrag.short_form import Passage
    rng = random.Random(267)
    n = 3
    rows, instructions, passages = [], [], []
    for i in range(n):
        q, texts = _words(rng, 5) + "?", [_words(rng, 2) for _ in range(4)]
        labels = ["A", "B", "C", "D"] if i % 2 == 0 else ["1", "2", "3", "4"]
        key = rng.choice(labels)
        ctxs = [{"title": _words(rng, 1), "text": _words(rng, 8)} for _ in range(6)]
        rows.append({"id": f"Q{i}", "question": q, "choices": {"text": texts, "label": labels}, "answerKey": key,
                     "ctxs": ctxs})
        instructions.append("Given four answer candidates, A, B, C and D, choose the best answer choice.\n\n"
                            f"### Input:\n{q}\nA: {texts[0]}\nB: {texts[1]}\nC: {texts[2]}\nD: {texts[3]}")
        passages.append([Passage(c["title"], c["text"]) for c in ctxs[:5]])
    direct = _direct(engine, instructions, passages, True, mode="always", max_new_tokens=6)
    path = _write_jsonl(tmp_path / "arc.jsonl", rows)
    out = tmp_path / "arc.jsonl.preds.jsonl"
    rc = main(["eval", "--task", "arc_challenge", "--input", path, "--model", str(tiny_checkpoint(**CKPT)),
               "--output", str(out), "--max-new-tokens", "6", "--mode", "always_retrieve", "--quiet"])
    assert rc == 0
    records, metrics = _read_outputs(out)
    assert [r["id"] for r in records] == [f"Q{i}" for i in range(n)]
    for rec, a, row in zip(records, direct, rows):
        assert rec["prediction"] == _cleaned(a.answer, closed=True)
        assert rec["retrieved"] and len(rec["trace"]["branches"]) == 5
        letter = "ABCD"[row["choices"]["label"].index(row["answerKey"])]
        assert rec["gold"] == [letter]
        choices = dict(zip("ABCD", row["choices"]["text"]))
        assert rec["metrics"]["accuracy"] == (1.0 if arc_letter(rec["prediction"], choices) == letter else 0.0)
    assert metrics["retrieval_frequency"] == 1.0 and metrics["primary_metric"] == "accuracy"
    assert metrics["metrics"]["accuracy"] == pytest.approx(sum(r["metrics"]["accuracy"] for r in records) / n)
    assert set(metrics["metrics"]) == {"accuracy", "match"}
    assert all(0.0 <= v <= 1.0 for v in metrics["metrics"].values())
    assert metrics["settings"]["closed_set"] is True and metrics["settings"]["ndocs"] == 5


def test_eval_reports_bad_input(tmp_path, capsys):
    ckpt = str(tiny_checkpoint(**CKPT))
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answers": ["a"], "ctxs": []}, {"question": "q"}])
    assert main(["eval", "--task", "popqa", "--input", path, "--model", ckpt, "--quiet"]) == 2
    assert "p.jsonl:2: no gold answers" in capsys.readouterr().err
    # Without passages in the row or an index, retrieval cannot happen.
    path = _write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answers": ["a"]}])
    assert main(["eval", "--task", "popqa", "--input", path, "--model", ckpt, "--quiet", "--mode", "always",
                 "--output", str(tmp_path / "n.out.jsonl")]) == 2
    assert "line 1: the row has no passages" in capsys.readouterr().err
    assert main(["eval", "--task", "popqa", "--input", path, "--model", ckpt, "--quiet", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("selfrag_engine.selfrag.long_form") is None,
                    reason="selfrag_engine.selfrag.long_form (LongFormSelfRAG) is not in this tree")
def test_eval_asqa_long_form_end_to_end(tmp_path):
    rng = random.Random(319)
    rows = [{"question": _words(rng, 5) + "?", "answer": _words(rng, 2),
             "qa_pairs": [{"short_answers": [_words(rng, 1)]}, {"short_answers": [_words(rng, 1), "x"]}],
             "docs": [{"title": _words(rng, 1), "text": _words(rng, 10)} for _ in range(6)]} for _ in range(2)]
    path = tmp_path / "asqa.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "asqa.preds.jsonl"
    rc = main(["eval", "--task", "asqa", "--input", str(path), "--model", str(tiny_checkpoint(**CKPT)),
               "--output", str(out), "--max-new-tokens", "6", "--max-depth", "2", "--ndocs", "2", "--quiet"])
    assert rc == 0
    records, metrics = _read_outputs(out)
    assert len(records) == 2 and all(r["retrieved"] for r in records)
    for rec in records:
        assert rec["metrics"]["str_em"] == pytest.approx(str_em(rec["prediction"], rec["qa_pairs"]))
    assert 0.0 <= metrics["metrics"]["str_em"] <= 1.0 and metrics["retrieval_frequency"] == 1.0


def test_evaluate_long_form_path_with_a_recording_runner(tmp_path):
    """The long-form branch of `evaluate` (passages per row, str_em, traces) against a runner that records its
    calls and answers with one of its passages' texts."""
    from dataclasses import dataclass

    from selfrag_engine.selfrag.evaluate import evaluate

    @dataclass
    class Segment:
        text: str
        passage: object

    @dataclass
    class Long:
        answer: str
        retrieved: bool
        segments: list
        citations: list

    class Runner:
        ndocs, mode = 2, "always"

        def __init__(self):
            self.calls = []

        def answer_batch(self, questions, passages=None, input=None):
            self.calls.append((list(questions), passages))
            return [Long(ps[0].text, True, [Segment(ps[0].text, ps[0])], [[0]]) for ps in passages]

    rng = random.Random(365)
    rows = [{"question": _words(rng, 4) + "?", "qa_pairs": [{"short_answers": [_words(rng, 1)]} for _ in range(2)],
             "docs": [{"title": _words(rng, 1), "text": _words(rng, 6)} for _ in range(3)]} for _ in range(3)]
    rows[0]["docs"][0]["text"] += " " + rows[0]["qa_pairs"][1]["short_answers"][0].upper()
    path = tmp_path / "asqa.json"
    path.write_text(json.dumps(rows))
    examples = read_examples(path, PRESETS["asqa"])
    runner = Runner()
    report = evaluate(runner, examples, PRESETS["asqa"], batch_size=2)
    assert [len(q) for q, _ in runner.calls] == [2, 1]
    assert all(len(ps) == 2 for _, batch in runner.calls for ps in batch)  # the first ndocs of each row
    assert runner.calls[0][0][0] == examples[0].instruction
    assert report.records[0]["metrics"]["str_em"] == 0.5  # one of the two short answers, case aside
    expect = sum(str_em(r["docs"][0]["text"], [p["short_answers"] for p in r["qa_pairs"]]) for r in rows) / 3
    assert report.metrics["str_em"] == pytest.approx(expect)
    assert report.retrieval_frequency == 1.0 and report.num_generated_tokens is None
    assert report.tokens_per_second is None
    seg = report.records[0]["trace"]["segments"][0]
    assert seg["text"] == rows[0]["docs"][0]["text"] and seg["passage"]["title"] == rows[0]["docs"][0]["title"]
    json.dumps(report.records)  # traces serialize


def test_build_runner_settings_and_compat():
    from selfrag_engine.errors import RequestError
    from selfrag_engine.selfrag.evaluate import options_for

    def scoring_for(preset, threshold, compat):
        return options_for(preset, threshold=threshold, compat=compat).scoring()

    paper, released = scoring_for(PRESETS["popqa"], 0.3, "paper"), scoring_for(PRESETS["popqa"], 0.3, "released")
    assert (paper.w_rel, paper.w_sup, paper.w_use, paper.use_seqscore, paper.threshold) == (1.0, 1.0, 0.5, True, 0.3)
    assert released.w_use == 1.0 and scoring_for(PRESETS["asqa"], 0.0, "released").w_use == 0.5
    with pytest.raises(RequestError, match="compat must be one of"):
        options_for(PRESETS["popqa"], compat="vllm")
    bio = options_for(PRESETS["bio"], beam_width=3)
    assert (bio.form, bio.beam_width, bio.max_depth) == ("long", 3, PRESETS["bio"].max_depth)


@pytest.mark.skipif(importlib.util.find_spec("selfrag_engine.selfrag.long_form") is not None,
                    reason="the long form is present")
def test_long_form_task_without_the_long_form_module(engine):
    from selfrag_engine.errors import RequestError
    from selfrag_engine.selfrag.evaluate import build_runner
    with pytest.raises(RequestError, match=r"selfrag_engine\.selfrag\.long_form"):
        build_runner(engine, PRESETS["bio"])
