"""The long-form judges of the tiny model's evaluation, on answers written here from the world's records.

Each answer is built from an entity's attribute values and passages (not from the judges), and each judge is
shown failing on the mistakes it exists to catch: a segment citing a distractor, a wrong year, another
entity's town, a one-segment answer. The training targets `long_form_data` writes, by other code from the same
records, must all pass."""
from __future__ import annotations

import random

import pytest

from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.long_form import LongAnswer, Segment
from selfrag_engine.tiny.evaluate import (
    answer_segments,
    citation_correct,
    compare_choices,
    score_long_form,
    segment_citations,
    stated_facts,
    world_and_split,
    world_passage,
)
from selfrag_engine.tiny.long_form_data import LongFormCase, entity_facts, plan_segments, training_case
from selfrag_engine.tiny.training_data import LexicalIndex


def Case(entity, instruction, facts=(), heldout_phrasing=False):
    return LongFormCase(entity, instruction, list(facts), [], heldout_phrasing)


def Fact(attribute, value):
    # The judges read a case's facts by attribute and value only.
    from selfrag_engine.tiny.long_form_data import Fact as DataFact
    return DataFact(attribute, value, None)


@pytest.fixture(scope="module")
def world():
    return world_and_split()[0]


@pytest.fixture(scope="module")
def person(world):
    """A person with both passages: the main one and the one about a move."""
    return next(e for e in world.entities if e.kind == "person" and "residence" in e.attributes)


@pytest.fixture(scope="module")
def town(world):
    return next(e for e in world.entities if e.kind == "town")


def _article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _main(world, e):
    return next(p for p in world.passages_of(e.id) if "birthplace" in p.states)


def _move(world, e):
    return next(p for p in world.passages_of(e.id) if p.states == ("residence",))


def _plain(p):
    # As a retriever hands it over: title, text and id only.
    return Passage(p.title, p.text, p.id)


def seg(text, passage, depth=1):
    return Segment(text, passage, depth, None, None, None, None, None, [])


def long_answer(segments):
    text = " ".join(s.text for s in segments if s.text.strip())
    return LongAnswer("q", text, segments, [s.passage for s in segments], 1.0,
                      any(s.passage is not None for s in segments), 0, 0.0, {})


def faithful(world, e):
    a = e.attributes
    pron = e.pronoun.capitalize()
    return [seg(f"{e.name} is {_article(a['occupation'])} from {a['country']}.", _plain(_main(world, e)), 1),
            seg(f"{pron} was born in {a['birthplace']} in {a['birth_year']}.", _plain(_main(world, e)), 2),
            seg(f"{pron} moved to {a['residence']}.", _plain(_move(world, e)), 3)]


def test_a_faithful_answer_passes_every_judge(world, person):
    segments = faithful(world, person)
    assert [citation_correct(world, person, s) for s in segments] == [True, True, True]
    facts = stated_facts(world, person, " ".join(s.text for s in segments))
    assert all(f.correct for f in facts)
    assert {(f.attribute, f.value) for f in facts} == set(person.attributes.items())
    case = Case(person, f"Tell me about {person.name}.", [Fact(k, v) for k, v in person.attributes.items()])
    scores = score_long_form(world, [case], [long_answer(segments)])
    assert (scores["multi_segment"], scores["citation"], scores["fact_precision"], scores["fact_recall"]) == \
        (1.0, 1.0, 1.0, 1.0)
    assert scores["segments_judged"] == 3 and scores["facts_stated"] == 5 and scores["failures"] == []


def test_a_segment_citing_a_distractor_fails(world, person):
    text = faithful(world, person)[1].text  # the birthplace and birth year
    other = next(e for e in world.entities if e.kind == "person" and e.id != person.id)
    assert citation_correct(world, person, seg(text, _plain(_main(world, other)))) is False
    # The entity's own passage about its move states neither: same title, wrong passage.
    assert citation_correct(world, person, seg(text, _plain(_move(world, person)))) is False
    assert citation_correct(world, person, seg(text, None, 0)) is False  # a fact with no citation
    # A segment stating no fact is not judged, whatever it cites.
    assert citation_correct(world, person, seg("I don't know.", _plain(_main(world, other)))) is None
    case = Case(person, "q", [])
    wrong = [faithful(world, person)[0], seg(text, _plain(_main(world, other)), 2)]
    assert score_long_form(world, [case], [long_answer(wrong)])["citation"] == 0.5


def test_a_wrong_year_is_a_wrong_fact(world, person, town):
    year = str(int(person.attributes["birth_year"]) + 1)
    s = seg(f"{person.name} was born in {year}.", _plain(_main(world, person)))
    [fact] = stated_facts(world, person, s.text)
    assert (fact.kind, fact.value, fact.correct) == ("year", year, False)
    assert citation_correct(world, person, s) is False
    founded = str(int(town.attributes["founded"]) - 1)
    facts = stated_facts(world, town, f"{town.name} was founded in {founded} on the {town.attributes['river']} river.")
    assert [(f.kind, f.correct) for f in facts] == [("year", False), ("river", True)]
    case = Case(person, "q", [Fact("birth_year", person.attributes["birth_year"])])
    scores = score_long_form(world, [case], [long_answer(faithful(world, person)[:1] + [s])])
    assert scores["fact_precision"] == round(2 / 3, 4)  # occupation and country right, the year wrong
    assert scores["fact_recall"] == 0.0


def test_the_move_year_is_cited_to_the_move_passage(world, person):
    move_year = next(w.strip(".,") for w in _move(world, person).text.split() if w.strip(".,").isdigit()
                     and len(w.strip(".,")) == 4)
    s = f"{person.pronoun.capitalize()} moved to {person.attributes['residence']} in {move_year}."
    assert all(f.correct for f in stated_facts(world, person, s))
    assert citation_correct(world, person, seg(s, _plain(_move(world, person)))) is True
    assert citation_correct(world, person, seg(s, _plain(_main(world, person)))) is False
    # Said of the birth, the move's town and year are wrong.
    born = f"{person.name} was born in {person.attributes['residence']} in {move_year}."
    assert not any(f.correct for f in stated_facts(world, person, born))


def test_another_entitys_town_is_wrong(world, person):
    a = person.attributes
    other = next(e for e in world.entities if e.kind == "person"
                 and e.attributes["birthplace"] not in (a["birthplace"], a.get("residence")))
    [fact] = stated_facts(world, person, f"{person.name} was born in {other.attributes['birthplace']}.")
    assert (fact.kind, fact.correct) == ("town", False)
    # A sentence about another person states that person's facts, even one equal to the asked person's.
    namesake_country = next(e for e in world.entities if e.kind == "person" and e.id != person.id
                            and e.attributes["country"] == a["country"])
    facts = stated_facts(world, person, f"{namesake_country.name} is from {a['country']}.")
    assert [f.correct for f in facts] == [False]
    # The asked person's own sentence with the same value is right.
    assert [f.correct for f in stated_facts(world, person, f"{person.name} is from {a['country']}.")] == [True]


def test_a_town_answer(world, town):
    a = town.attributes
    text = (f"{town.name} is a town in {a['country']}. It lies on the {a['river']} river. "
            f"It was founded in {a['founded']}.")
    passage = _plain(world.passages_of(town.id)[0])
    assert citation_correct(world, town, seg(text, passage)) is True
    facts = stated_facts(world, town, text)
    assert {(f.attribute, f.value) for f in facts} == set(a.items())  # the town's own name is no claim
    other_town = next(e for e in world.entities if e.kind == "town" and e.id != town.id)
    assert [f.correct for f in stated_facts(world, town, f"It lies near {other_town.name}.")] == [False]


def test_a_one_segment_answer_is_not_multi_segment(world, person):
    one = faithful(world, person)[:1] + [seg("", None, 2), seg("  ", None, 3)]
    assert len(answer_segments(one)) == 1
    case = Case(person, "q", [])
    scores = score_long_form(world, [case, case], [long_answer(one), long_answer(faithful(world, person))])
    assert scores["multi_segment"] == 0.5
    assert scores["failures"][0]["answer"] == one[0].text


def test_beam_against_greedy_counts_net_correct_facts(world, person):
    good = long_answer(faithful(world, person))
    short = long_answer(faithful(world, person)[:1])
    wrong = long_answer([seg(f"{person.name} was born in {int(person.attributes['birth_year']) + 3}.", None, 0)])
    case = Case(person, "q", [])
    assert compare_choices(world, [case] * 4, [good, short, short, wrong], [short, good, short, short]) == \
        {"wins": 1, "ties": 1, "losses": 2}


def test_a_passage_from_elsewhere_is_an_error(world, person):
    with pytest.raises(ValueError, match="not a passage of world"):
        world_passage(world, Passage("Nowhere", "Nothing here.", "1"))
    assert world_passage(world, _plain(_main(world, person))) == _main(world, person)


def test_nothing_stated_is_not_measured_as_zero(world, person):
    case = Case(person, "q", [Fact("occupation", person.attributes["occupation"])])
    scores = score_long_form(world, [case], [long_answer([seg("Hello there!", None, 0)])])
    assert (scores["segments_judged"], scores["citation"], scores["facts_stated"], scores["fact_precision"]) == \
        (0, None, 0, None)
    assert scores["fact_recall"] == 0.0 and scores["multi_segment"] == 0.0


def test_a_fact_said_again_needs_no_new_citation(world, person):
    a = person.attributes
    pron = person.pronoun.capitalize()
    born = seg(f"{person.name} was born in {a['birthplace']}.", _plain(_main(world, person)), 1)
    # Self-RAG's "partially supported" sentence: the move passage states the residence, not the birthplace.
    moved = seg(f"{pron} later moved from {a['birthplace']} to {a['residence']}.", _plain(_move(world, person)), 2)
    assert [f.attribute for f in stated_facts(world, person, moved.text)] == ["birthplace", "residence"]
    assert segment_citations(world, person, [born, moved]) == [True, True]
    assert citation_correct(world, person, moved) is False  # said first here, the birthplace is uncited
    assert segment_citations(world, person, [born, seg(born.text, None, 2)]) == [True, None]
    # The move's towns swapped: both wrong, and an earlier right birthplace does not excuse the segment.
    swapped = seg(f"{pron} later moved from {a['residence']} to {a['birthplace']}.", _plain(_move(world, person)))
    assert [f.correct for f in stated_facts(world, person, swapped.text)] == [False, False]
    assert segment_citations(world, person, [born, swapped]) == [True, False]


def test_the_judges_accept_every_answer_the_training_data_writes(world):
    """The training targets of `long_form_data` (written from the same records by other code) pass: every
    sentence's facts right, each segment citing the passage the tree would hand it (the one shown before it,
    or for a continuation the previous one), all of the entity's facts stated."""
    rng = random.Random(0)
    index = LexicalIndex.build(world.passages)
    people = [e for e in world.entities if e.kind == "person"]
    for entity in rng.sample(people, 80) + [e for e in world.entities if e.kind == "town"][:20]:
        segments, shown = [], None
        for planned in plan_segments(training_case(world, entity, index, rng), rng):
            if planned.form in ("retrieval", "again"):
                shown = planned.shown
            segments.append(seg(planned.sentence, shown))
        assert False not in segment_citations(world, entity, segments), (entity, segments)
        facts = stated_facts(world, entity, " ".join(s.text for s in segments))
        assert all(f.correct for f in facts)
        assert {(f.attribute, f.value) for f in facts} == {(f.attribute, f.value)
                                                          for f in entity_facts(world, entity)}


def test_the_evaluation_command_reports_the_long_form(tmp_path):
    """`python -m selfrag_engine.tiny.evaluate`, run from another directory as a user runs it, prints the long
    form's measures for both flavours, beam and greedy, beside the short form's."""
    import json
    import subprocess
    import sys

    from tests.helpers import tiny_model_dir

    model = tiny_model_dir()
    if not (model / "model.safetensors").is_file():
        pytest.skip("tiny_selfrag not present")
    result = subprocess.run([sys.executable, "-m", "selfrag_engine.tiny.evaluate", str(model),
                             "--world-questions", "4", "--instructions", "4", "--long-form", "6", "--threads", "1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["world_questions"], report["instructions"]) == (4, 4) and "failures" not in report
    long_form = report["long_form"]
    assert long_form["cases"] == 6 and long_form["settings"]["beam_width"] == 2
    for compat, mode in (("paper", "adaptive"), ("released", "always")):
        part = long_form[compat]
        assert part["mode"] == mode
        assert sum(part["beam_vs_greedy"].values()) == 6
        assert sum(p["answers"] for p in part["by_phrasing"].values()) == 6
        for path in ("beam", "greedy"):
            scores = part[path]
            assert scores["answers"] == 6 and "failures" not in scores
            for key in ("multi_segment", "retrieved", "citation", "fact_precision", "fact_recall"):
                assert scores[key] is None or 0.0 <= scores[key] <= 1.0, (compat, path, key, scores)
    assert long_form["released"]["beam"]["retrieved"] == 1.0  # it always retrieves
    # The misses to read come on stderr, one JSON object a line, the long form's named by flavour.
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert {f["long_form"] for f in lines if "long_form" in f} <= {"paper", "released"}
