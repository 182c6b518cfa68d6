"""Long-form training data from the synthetic world: requests, held-out cases, and training targets in the
format of Self-RAG's long-form data, each sentence checked against the world's passages."""
from __future__ import annotations

import random
import re

import pytest

from selfrag_engine.tiny import build_world
from selfrag_engine.tiny.long_form_data import (
    LONG_FORM_PROMPTS,
    MAX_SEGMENTS,
    MIN_SEGMENTS,
    Fact,
    long_form_cases,
    long_form_example,
    long_form_irrelevant_example,
    training_case,
    training_examples,
)
from selfrag_engine.tiny.training_data import (
    IRRELEVANT_ANSWER,
    LexicalIndex,
    TrainingStream,
    encode_example,
    split_world,
)
from selfrag_engine.tiny.world import remix_world
from selfrag_engine.vocab import ADDED_TOKENS, GROUPS, PARAGRAPH_CLOSE, PARAGRAPH_OPEN


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def split(world):
    return split_world(world, 0.15, seed=0)


@pytest.fixture(scope="module")
def index(world, split):
    held = set(split.heldout_entities)
    return LexicalIndex.build([p for p in world.passages if p.entity_id not in held])


def _training_examples(world, entities, index, seed, n_per=1):
    rng = random.Random(seed)
    out = []
    for e in entities:
        for _ in range(n_per):
            case = training_case(world, e, index, rng)
            out.append((case, long_form_example(case, rng)))
    return out


@pytest.fixture(scope="module")
def examples(world, split, index):
    """Training targets about training entities of the main world, a fresh world and a remixed one."""
    train = [world.entity(i) for i in split.train_entities]
    out = [(world, c, ex) for c, ex in _training_examples(world, train[::2], index, seed=0)]
    fresh = build_world(77)
    out += [(fresh, c, ex) for c, ex in
            _training_examples(fresh, fresh.entities[::6], LexicalIndex.build(fresh.passages), seed=1)]
    remix = remix_world(world, 5, split.train_entities, num_people=60)
    out += [(remix, c, ex) for c, ex in
            _training_examples(remix, remix.entities, LexicalIndex.build(remix.passages), seed=2)]
    return out


# ---- a reader of the reference format, written from the Self-RAG data's definition ----------------------

_TOKEN = re.compile("(" + "|".join(re.escape(t) for t in ADDED_TOKENS) + ")")
RETRIEVAL, NO_RETRIEVAL, CONTINUE = "[Retrieval]", "[No Retrieval]", "[Continue to Use Evidence]"


def parse(response: str) -> tuple[list[dict], str]:
    """The response's sentences, each as the data writes it: `[Retrieval]<paragraph>{title}\\n{text}</paragraph>`
    then `[Relevant]{sentence}{grounding}` or `[Irrelevant]{sentence}`; `[Continue to Use Evidence]{sentence}`;
    `[No Retrieval]{sentence}`; then one utility token. Raises AssertionError on any other order."""
    pieces = [p for p in _TOKEN.split(response) if p]
    segments: list[dict] = []
    i = 0

    def text_at(j: int) -> str:
        assert j < len(pieces) and pieces[j] not in ADDED_TOKENS, (j, pieces)
        return pieces[j]

    while pieces[i] in GROUPS["retrieval"]:
        token = pieces[i]
        if token == RETRIEVAL:
            assert pieces[i + 1] == PARAGRAPH_OPEN and pieces[i + 3] == PARAGRAPH_CLOSE, pieces[i:i + 4]
            title, text = text_at(i + 2).split("\n")
            relevance = pieces[i + 4]
            assert relevance in GROUPS["relevance"], relevance
            sentence = text_at(i + 5)
            i += 6
            grounding = None
            if relevance == "[Relevant]":
                grounding = pieces[i]
                assert grounding in GROUPS["grounding"], grounding
                i += 1
            segments.append({"token": token, "title": title, "text": text, "relevance": relevance,
                             "sentence": sentence, "grounding": grounding})
        else:
            segments.append({"token": token, "sentence": text_at(i + 1), "relevance": None, "grounding": None})
            i += 2
    assert i == len(pieces) - 1, pieces[i:]
    assert pieces[i] in GROUPS["utility"]
    return segments, pieces[i]


def _passage(world, title: str, text: str):
    found = [p for p in world.passages if p.title == title and p.text == text]
    assert len(found) == 1, (title, text)
    return found[0]


def _stated(entity, sentence: str) -> set[str]:
    return {a for a, v in entity.attributes.items() if re.search(rf"\b{re.escape(v)}\b", sentence)}


# ---- requests and held-out cases ----------------------------------------------------------------------


def test_prompts_keep_their_heldout_phrasings_apart():
    assert set(LONG_FORM_PROMPTS) == {"person", "town"}
    for train, held in LONG_FORM_PROMPTS.values():
        assert train and held and not set(train) & set(held)
        assert all(f.count("{name}") == 1 for f in train + held)
    # The bio request of the reference's FactScore task, and the README's, is a training phrasing.
    assert "Tell me a bio of {name}." in LONG_FORM_PROMPTS["person"][0]


def test_cases_ask_about_heldout_entities_with_their_passages_and_distractors(world, split):
    cases = long_form_cases(world, split)
    held = set(split.heldout_entities)
    assert len(cases) == 2 * len(held)
    assert {c.entity.id for c in cases} == held
    assert sum(c.heldout_phrasing for c in cases) == len(held)
    for c in cases:
        train, heldout = LONG_FORM_PROMPTS[c.entity.kind]
        forms = heldout if c.heldout_phrasing else train
        assert c.instruction in {f.format(name=c.entity.name) for f in forms}
        assert len(c.passages) == 5
        own = world.passages_of(c.entity.id)
        assert [p for p in c.passages if p.entity_id == c.entity.id] == [p for p in c.passages if p in own]
        assert all(p in c.passages for p in own)
        for p in c.passages:
            if p.entity_id != c.entity.id:
                assert c.entity.name not in p.text
        # Every attribute, once, with the passage stating it.
        assert sorted(f.attribute for f in c.facts) == sorted(c.entity.attributes)
        for f in c.facts:
            assert isinstance(f, Fact) and f.value == c.entity.attributes[f.attribute]
            assert f.passage.entity_id == c.entity.id and f.attribute in f.passage.states
            assert f.value in f.passage.text and f.passage in c.passages
    assert [c.instruction for c in long_form_cases(world, split, n=20, seed=0)] == \
        [c.instruction for c in cases[:20]]
    assert [c.instruction for c in long_form_cases(world, split, n=20, seed=1)] != \
        [c.instruction for c in cases[:20]]


def test_heldout_cases_become_targets_in_order(world, split):
    # The evaluation's cases list the facts in an order one answer states them in.
    for c in long_form_cases(world, split, n=40):
        segments, utility = parse(long_form_example(c, random.Random(0)).response)
        assert utility == "[Utility:5]"
        said = [a for s in segments for a in sorted(_stated(c.entity, s["sentence"]))]
        assert set(said) == set(c.entity.attributes)


# ---- the training targets --------------------------------------------------------------------------------


def test_targets_follow_the_reference_long_form_format(examples):
    forms = {"retrieval": 0, "again": 0, "continue": 0, "no_retrieval": 0, "irrelevant": 0, "partial": 0}
    for world, case, ex in examples:
        assert ex.kind == "long_form" and ex.instruction == case.instruction
        assert ex.prompt == f"### Instruction:\n{ex.instruction}\n\n### Response:\n"
        segments, utility = parse(ex.response)
        assert utility == "[Utility:5]"
        assert MIN_SEGMENTS <= len(segments) <= MAX_SEGMENTS, ex.response
        first = segments[0]
        # The answer starts by asking for evidence and reading a relevant passage.
        assert first["token"] == RETRIEVAL and first["relevance"] == "[Relevant]"
        assert case.entity.name in first["sentence"]
        last_title = None
        for s in segments:
            if s["token"] == RETRIEVAL:
                key = "irrelevant" if s["relevance"] == "[Irrelevant]" else (
                    "again" if (s["title"], s["text"]) == last_title else "retrieval")
                forms[key] += 1
                forms["partial"] += s["grounding"] == "[Partially supported]"
                if s["relevance"] == "[Relevant]":
                    last_title = (s["title"], s["text"])
            else:
                forms["continue" if s["token"] == CONTINUE else "no_retrieval"] += 1
            # Sentences are glued to the tokens around them, as the data joins them.
            assert s["sentence"] == s["sentence"].strip() and s["sentence"].endswith(".")
            assert "[No support / Contradictory]" != s["grounding"]
    assert all(n > 5 for n in forms.values()), forms


def test_every_sentence_states_facts_of_the_passage_it_is_written_from(examples):
    for world, case, ex in examples:
        entity = case.entity
        segments, _ = parse(ex.response)
        evidence = None
        said: set[str] = set()
        for s in segments:
            stated = _stated(entity, s["sentence"])
            assert stated, s
            if s["token"] == RETRIEVAL:
                shown = _passage(world, s["title"], s["text"])
                if s["relevance"] == "[Irrelevant]":
                    # A distractor: about someone else, not naming the entity; the sentence goes on from the
                    # evidence read before.
                    assert shown.entity_id != entity.id and entity.name not in shown.text
                    assert shown in case.passages
                else:
                    assert shown.entity_id == entity.id
                    evidence = shown
            assert evidence is not None, "no sentence before the first passage"
            supported = {a for a in stated if a in evidence.states and entity.attributes[a] in evidence.text}
            if s["grounding"] == "[Partially supported]":
                assert supported and stated - supported and stated - supported <= said, s
            else:
                assert supported == stated, (s, evidence)
            new = stated - said
            assert new, f"a sentence that says nothing new: {s}"
            said |= stated
        assert said == set(entity.attributes), ex.response
        # The case's facts are the answer's, in the order the answer states them, each with its passage.
        at, said = 0, set()
        for s in segments:
            new = _stated(entity, s["sentence"]) - said
            facts = case.facts[at:at + len(new)]
            assert {f.attribute for f in facts} == new, (s, facts)
            at += len(new)
            said |= new
        assert at == len(case.facts)


def test_irrelevant_target_refuses(world, split, index):
    rng = random.Random(3)
    for e in [world.entity(i) for i in split.train_entities[:60]]:
        case = training_case(world, e, index, rng)
        ex = long_form_irrelevant_example(case, rng)
        segments, utility = parse(ex.response)
        assert ex.kind == "long_form_irrelevant" and utility == "[Utility:1]"
        assert len(segments) == 1 and segments[0]["relevance"] == "[Irrelevant]"
        assert segments[0]["sentence"] == IRRELEVANT_ANSWER
        shown = _passage(world, segments[0]["title"], segments[0]["text"])
        assert shown.entity_id != e.id and e.name not in shown.text


def test_targets_are_deterministic_by_seed(world, split, index):
    entities = [world.entity(i) for i in split.train_entities[:40]]

    def run(seed):
        rng = random.Random(seed)
        return [ex.response for e in entities for ex in training_examples(world, e, index, rng)]

    assert run(0) == run(0) and run(0) != run(1)


# ---- tokens and loss mask ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, world, split, examples):
    from selfrag_engine.tiny.train import tokenizer_sentences, write_world_tokenizer

    path = tmp_path_factory.mktemp("long-form-tokenizer")
    sentences = tokenizer_sentences(TrainingStream(world, split, seed=1), 600)
    for text in [ex.prompt + ex.response for _, _, ex in examples[:200]]:
        for tok in ADDED_TOKENS:
            text = text.replace(tok, "\n")
        sentences += [line for line in text.split("\n") if line]
    write_world_tokenizer(path, sentences, 600)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from selfrag_engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tokenizer_dir)


def test_loss_mask_leaves_out_every_passage_body(examples, tokenizer):
    ids_of = tokenizer.token_to_id
    open_id, close_id, ret_id = ids_of(PARAGRAPH_OPEN), ids_of(PARAGRAPH_CLOSE), ids_of(RETRIEVAL)
    for _, case, ex in examples[::5]:
        enc = encode_example(ex, tokenizer)
        n = len(tokenizer.encode(ex.prompt, add_bos=True))
        assert not any(enc.loss_mask[:n]) and enc.loss_mask[-1] and enc.input_ids[-1] == tokenizer.eos_id
        opens = [i for i, t in enumerate(enc.input_ids) if t == open_id]
        closes = [i for i, t in enumerate(enc.input_ids) if t == close_id]
        assert len(opens) == len(closes) == ex.response.count(PARAGRAPH_OPEN) >= 1
        bodies = set()
        for o, c in zip(opens, closes):
            assert n < o < c and enc.input_ids[o - 1] == ret_id
            assert enc.loss_mask[o - 1] and enc.loss_mask[o], "[Retrieval] and <paragraph> are targets"
            assert not any(enc.loss_mask[o + 1:c + 1]), "the passage and </paragraph> are not targets"
            assert tokenizer.decode(enc.input_ids[o + 1:c], skip_special_tokens=True).strip() in \
                {p.title + "\n" + p.text for p in case.passages}
            bodies |= set(range(o + 1, c + 1))
        # Everything else the model writes is a target: decisions, sentences, critiques, </s>.
        assert all(enc.loss_mask[i] for i in range(n, len(enc.input_ids)) if i not in bodies)


def test_long_form_text_tokenizes_as_transformers_does(examples, tokenizer, tokenizer_dir):
    from tests.helpers import slow_llama_tokenizer

    hf = slow_llama_tokenizer().from_pretrained(str(tokenizer_dir))
    for _, _, ex in examples[::20]:
        text = ex.prompt + ex.response
        assert tokenizer.encode(text, add_bos=True) == hf.encode(text)


# ---- the training stream ---------------------------------------------------------------------------------


def _stream(world, split, seed, **kw):
    return TrainingStream(world, split, seed=seed, long_form_fraction=0.4, long_form=training_examples, **kw)


def test_stream_mixes_long_form_requests_about_unseen_and_training_entities_only(world, split):
    held = [world.entity(i) for i in split.heldout_entities]
    held_people = [e.name for e in held if e.kind == "person"]
    held_passages = {p.text for e in held for p in world.passages_of(e.id)}
    heldout_forms = [f for _, forms in LONG_FORM_PROMPTS.values() for f in forms]
    heldout_re = re.compile("|".join(re.escape(f).replace(r"\{name\}", ".+") for f in heldout_forms))
    main_names = {e.name for e in world.entities}
    stream = _stream(world, split, seed=3, new_world_questions=100)
    kinds: dict[str, int] = {}
    about_main = about_other = 0
    for _ in range(1500):
        ex = stream.next()
        kinds[ex.kind] = kinds.get(ex.kind, 0) + 1
        text = ex.instruction + ex.response
        assert not any(name in text for name in held_people), text
        assert not any(p in ex.response for p in held_passages), text
        assert not heldout_re.fullmatch(ex.instruction), ex.instruction
        if ex.kind == "long_form":
            parse(ex.response)
            named = [n for n in main_names if n in ex.instruction]
            about_main += bool(named)
            about_other += not named
    assert set(kinds) == {"relevant", "irrelevant", "no_fact", "long_form", "long_form_irrelevant"}
    # 40% of the world draws: about 1 example in 7 is a long-form answer.
    assert 0.09 < kinds["long_form"] / 1500 < 0.2, kinds
    # Mostly about people and towns of fresh worlds, seen once, whose passages must be read.
    assert about_other > 2 * about_main > 0, (about_main, about_other)


def test_stream_with_long_form_is_deterministic_and_needs_its_maker(world, split):
    first = [(e.instruction, e.response) for e in (lambda s: [s.next() for _ in range(300)])(_stream(world, split, 4))]
    again = [(e.instruction, e.response) for e in (lambda s: [s.next() for _ in range(300)])(_stream(world, split, 4))]
    assert first == again
    with pytest.raises(ValueError, match="long_form"):
        TrainingStream(world, split, seed=0, long_form_fraction=0.2)


def test_demo_examples_hold_long_form_requests_about_heldout_entities(world, split, tmp_path):
    import json

    from selfrag_engine.tiny.train import write_examples

    write_examples(world, split, tmp_path)
    requests = json.loads((tmp_path / "examples.json").read_text())["long_form"]
    held = {world.entity(i).name: world.entity(i) for i in split.heldout_entities}
    assert [held[r["entity"]].kind for r in requests] == ["person", "person", "town"]
    for r in requests:
        entity = held[r["entity"]]
        assert r["facts"] == entity.attributes
        assert r["instruction"] in {f.format(name=entity.name) for f in LONG_FORM_PROMPTS[entity.kind][0]}


def test_the_engine_inserts_a_passage_as_the_tokens_trained_at_that_place(examples, tokenizer):
    """The long-form tree cuts a segment at a retrieval token and forks children with
    `passage_suffixes` appended: the prompt and every passage must be the very tokens the target holds there,
    or the model meets text it was never trained on at every depth."""
    from selfrag_engine.retrieval.passages import Passage
    from selfrag_engine.selfrag.decisions import passage_suffixes
    from selfrag_engine.selfrag.prompts import format_prompt

    ret = tokenizer.token_to_id(RETRIEVAL)
    stops = {tokenizer.token_to_id(t) for t in (RETRIEVAL, NO_RETRIEVAL, CONTINUE, PARAGRAPH_OPEN)}
    for _, case, ex in examples[::4]:
        ids = encode_example(ex, tokenizer).input_ids
        prompt = tokenizer.encode(format_prompt(case.instruction))
        assert ids[:len(prompt)] == prompt
        segments, _ = parse(ex.response)
        starts = [i for i in range(len(prompt), len(ids)) if ids[i] in stops - {tokenizer.token_to_id(PARAGRAPH_OPEN)}]
        assert len(starts) == len(segments) and starts[0] == len(prompt)
        for at, s in zip(starts, segments):
            if s["token"] != RETRIEVAL:
                continue
            assert ids[at] == ret
            suffix = passage_suffixes(tokenizer, [Passage(s["title"], s["text"], "0")])[0]
            assert ids[at:at + len(suffix)] == suffix
