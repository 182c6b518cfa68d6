"""The synthetic world, its Self-RAG training data, and the committed tiny model's behaviour on held-out data."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from selfrag_engine.tiny import build_world
from selfrag_engine.tiny.world import remix_world
from selfrag_engine.tiny.training_data import (
    ADJECTIVES, HELDOUT_CHAT, HELDOUT_COUNT_STARTS, HELDOUT_TASKS, HELDOUT_WORDS, IRRELEVANT_ANSWER, NOUNS,
    PERSON_QUESTIONS, SHAPE_TASKS, SKILL_TASKS, TOWN_QUESTIONS, TRAIN_TASKS, UNTAUGHT_WORDS, Example,
    LexicalIndex, TrainingStream, _heldout_pair, branch_cases, encode_example, fresh_source, heldout_instructions,
    heldout_questions, is_relevant, questions_for, retrieved_distractors, split_world, training_distractor, untaught,
)
from selfrag_engine.tiny.evaluate import instruction_breakdown

CHECKPOINT = Path(__file__).resolve().parent.parent / "selfrag_engine" / "data" / "tiny_selfrag"


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def split(world):
    return split_world(world, 0.15, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, world, split):
    from selfrag_engine.tokenizer import Tokenizer
    from selfrag_engine.tiny.train import tokenizer_sentences, write_world_tokenizer

    path = tmp_path_factory.mktemp("world-tokenizer")
    write_world_tokenizer(path, tokenizer_sentences(TrainingStream(world, split, seed=1), 1500), 600)
    return Tokenizer.from_pretrained(path)


def _digest(world) -> str:
    records = [(e.id, e.kind, e.name, sorted(e.attributes.items())) for e in world.entities]
    records += [(p.id, p.title, p.text, p.entity_id, p.states) for p in world.passages]
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


# ---- the world ---------------------------------------------------------------------------------------


def test_world_is_deterministic_across_processes(world):
    # A fresh interpreter with another hash seed: nothing may depend on set or dict-of-str iteration order.
    code = ("import sys; sys.path.insert(0, %r); from tests.test_world import _digest; "
            "from selfrag_engine.tiny import build_world; print(_digest(build_world(0)))"
            % str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert out == _digest(world) == _digest(build_world(0))
    assert _digest(build_world(1)) != _digest(world)


def test_world_shape_and_unique_names(world):
    people = [e for e in world.entities if e.kind == "person"]
    towns = [e for e in world.entities if e.kind == "town"]
    assert len(people) == 360 and len(towns) == 80
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    # By default no two people share a first or a last name.
    assert len({e.name.split()[0] for e in people}) == len({e.name.split()[1] for e in people}) == 360
    assert not set(world.towns) & set(world.countries) | set(world.towns) & set(world.rivers)
    assert len({p.id for p in world.passages}) == len(world.passages)
    assert {e.attributes["birthplace"] for e in people} <= set(world.towns)


def test_smaller_name_pools_make_namesakes():
    world = build_world(0, num_first_names=70, num_last_names=110)
    people = [e for e in world.entities if e.kind == "person"]
    firsts, lasts = {e.name.split()[0] for e in people}, {e.name.split()[1] for e in people}
    assert len(people) == 360 == len({e.name for e in people})
    assert len(firsts) <= 70 and len(lasts) <= 110


def test_passages_state_exactly_their_attributes(world):
    for p in world.passages:
        e = world.entity(p.entity_id)
        assert p.title == e.name and e.name in p.text
        assert 1 <= p.text.count(".") <= 3
        for attribute in p.states:
            assert e.attributes[attribute] in p.text, (p, attribute)
        for attribute, value in e.attributes.items():
            if attribute not in p.states and attribute != "country":
                assert value not in p.text, (p, attribute)
    # Every attribute of every entity is stated by exactly one passage.
    for e in world.entities:
        for attribute in e.attributes:
            assert sum(attribute in p.states for p in world.passages_of(e.id)) == 1


# ---- the held-out split ----------------------------------------------------------------------------


def test_split_is_disjoint_seeded_and_covers_both_kinds(world, split):
    held, train = set(split.heldout_entities), set(split.train_entities)
    assert not held & train
    assert held | train == {e.id for e in world.entities}
    assert split == split_world(world, 0.15, seed=0) and split != split_world(world, 0.15, seed=1)
    for kind, n in (("person", 360), ("town", 80)):
        assert sum(world.entity(i).kind == kind for i in held) == round(0.15 * n)


def test_training_stream_never_shows_heldout_entities_or_phrasings(world, split):
    held = [world.entity(i) for i in split.heldout_entities]
    held_people = [e.name for e in held if e.kind == "person"]
    held_passages = {p.text for e in held for p in world.passages_of(e.id)}
    heldout_forms = [f for table in (PERSON_QUESTIONS, TOWN_QUESTIONS) for _, forms in table.values() for f in forms]
    heldout_re = re.compile("|".join(re.escape(f).replace(r"\{name\}", ".+") for f in heldout_forms))
    stream = TrainingStream(world, split, seed=3, copy_fraction=0.5, skill_fraction=0.5, shape_fraction=0.3)
    kinds = set()
    for _ in range(3000):
        ex = stream.next()
        kinds.add(ex.kind)
        text = ex.instruction + ex.response
        assert not any(name in text for name in held_people), text
        assert not any(p in ex.response for p in held_passages), text
        assert not heldout_re.fullmatch(ex.instruction), ex.instruction
        for a, b in re.findall(r"(\d+) (?:plus|minus|times|and|by|from|greater than) (\d+)", ex.instruction):
            assert not _heldout_pair(int(a), int(b)), ex.instruction
        for start in re.findall(r"[Cc]ount (?:up )?from (\d+)", ex.instruction):
            assert int(start) not in HELDOUT_COUNT_STARTS, ex.instruction
        if ex.kind == "no_fact":
            assert not set(re.findall(r"[a-z]+", text)) & HELDOUT_WORDS, text
        # What `untaught` says no training example shows.
        assert not set(re.findall(r"[a-z]+", text.lower())) & set(UNTAUGHT_WORDS.values()), text
        assert ex.instruction not in HELDOUT_CHAT, text
    assert kinds == {"relevant", "irrelevant", "no_fact"}


def test_heldout_instructions_are_unseen(world, split):
    stream = TrainingStream(world, split, seed=4, skill_fraction=0.5, shape_fraction=0.3)
    seen = {stream.next().instruction for _ in range(20000)}
    held = heldout_instructions(world, split, 300, seed=0)
    assert len(held) == 300 and all(e.kind == "no_fact" for e in held)
    assert not {e.instruction for e in held} & seen
    assert HELDOUT_TASKS and not set(HELDOUT_TASKS) & set(TRAIN_TASKS)


def _rewritten_phrase(instruction: str, answer: str) -> str | None:
    """The phrase a repeating or case-changing instruction gives, its answer checked; None for other tasks."""
    if m := re.fullmatch(r"(?:Repeat the phrase|Repeat after me|Please repeat|Copy this text|Say this back to me"
                         r"|Write this again): (.+)", instruction):
        assert answer == m[1]
    elif m := re.fullmatch(r"(?:Write '|Put ')(.+)' in (?:capital letters|upper case)\.", instruction) or \
            re.fullmatch(r"(?:Convert to uppercase|Rewrite in capital letters|Please write this in uppercase): (.+)",
                         instruction):
        assert answer == m[1].upper() != m[1]
    elif m := re.fullmatch(r"(?:Convert to lowercase|Rewrite in small letters|Put this in lowercase): (.+)",
                           instruction):
        assert answer == m[1].lower() != m[1]
    return m[1] if m else None


def test_skill_tasks_answer_what_they_ask():
    rng = random.Random(5)
    seen = {task: 0 for task in SKILL_TASKS}
    for _ in range(600):
        task = rng.choice(SKILL_TASKS)
        seen[task] += 1
        instruction, answer = task(rng, False, [])
        if (phrase := _rewritten_phrase(instruction, answer)) is not None:
            assert 1 <= len(phrase.split()) <= 7
        elif m := re.search(r"(\d+) (plus|and|minus|from|away from) (\d+)", instruction):
            a, b = int(m[1]), int(m[3])
            if "plus" in instruction or "sum" in instruction or "add" in instruction.lower():
                assert answer == f"{a} + {b} = {a + b}."
            else:
                big, small = (b, a) if m[2].endswith("from") else (a, b)
                assert big >= small and answer == f"{big} - {small} = {big - small}."
            assert max(a, b) <= 50 and not _heldout_pair(a, b)
        else:
            m = re.fullmatch(r"(?:Please count|Count up|Count) from (\d+) to (\d+)\.", instruction)
            assert m, instruction
            a, b = int(m[1]), int(m[2])
            assert a >= HELDOUT_COUNT_STARTS.stop and answer == ", ".join(map(str, range(a, b + 1))) + "."
    assert min(seen.values()) > 50


def test_heldout_pairs_are_pairs_of_last_digits():
    # So no training sum, difference or product holds a held-out pair's two last digits together.
    assert all(_heldout_pair(a, b) == _heldout_pair(a % 10, b % 10) for a in range(100) for b in range(100))
    assert 0 < sum(_heldout_pair(a, b) for a in range(10) for b in range(10)) < 20


def test_untaught_names_what_a_heldout_answer_needs_that_training_never_shows(world, split):
    def ex(instruction: str, task: str) -> Example:
        return Example(instruction, "", "no_fact", task=task)

    assert untaught(ex("What is the product of 5 and 3?", "h_mul")) == "word"
    assert untaught(ex("Is 13 smaller than 35?", "h_compare")) == "word"
    assert untaught(ex("Good evening!", "h_chat")) == untaught(ex("Thanks a lot!", "chat")) == "greeting"
    assert untaught(ex("What is 7 plus 7?", "add")) == untaught(ex("How much is 15 plus 8?", "h_add")) == "digit fact"
    assert untaught(ex("Multiply 8 by 5.", "mul")) == untaught(ex("Subtract 5 from 13.", "sub")) == "digit fact"
    # A rule training shows: an operand ending in 0, a factor 0, 1 or 10; a pair training shows.
    for text, task in (("Add 3 and 20.", "add"), ("What is the sum of 0 and 13?", "add"), ("Calculate 6 times 1.", "mul"),
                       ("What do you get when you multiply 3 by 10?", "mul"), ("What is 2 plus 3?", "add"),
                       ("Count from 19 to 21.", "count"), ("Make this uppercase: cold letter", "h_upper")):
        assert untaught(ex(text, task)) == "", text
    kinds = Counter(untaught(e) for e in heldout_instructions(world, split, 300, seed=0))
    assert set(kinds) == {"", "word", "greeting", "digit fact"} and kinds[""] > 100


def test_instruction_breakdown_counts_exact_answers_per_key():
    examples = [Example("What is 7 plus 7?", "[No Retrieval]7 + 7 = 14.[Utility:5]", "no_fact", task="add"),
                Example("Add 3 and 20.", "[No Retrieval]3 + 20 = 23.[Utility:5]", "no_fact", task="add"),
                Example("Hey there!", "[No Retrieval]Hello! How can I help you today?[Utility:4]", "no_fact",
                        task="h_chat")]
    answers = [SimpleNamespace(answer=" 7 + 7 = 14."), SimpleNamespace(answer="3 + 20 = 22."),
               SimpleNamespace(answer="Hello! How can I help you today?")]
    assert instruction_breakdown(examples, answers, lambda e: e.task) == {
        "add": {"instructions": 2, "exact": 0.5}, "h_chat": {"instructions": 1, "exact": 1.0}}
    assert instruction_breakdown(examples, answers, lambda e: untaught(e) or "nothing") == {
        "digit fact": {"instructions": 1, "exact": 1.0}, "greeting": {"instructions": 1, "exact": 1.0},
        "nothing": {"instructions": 1, "exact": 0.0}}


def test_shape_tasks_answer_what_they_ask():
    rng = random.Random(6)
    seen = {task: 0 for task in SHAPE_TASKS}
    lengths, last_words = set(), set()
    trained = set(ADJECTIVES + NOUNS)
    for _ in range(900):
        task = rng.choice(SHAPE_TASKS)
        seen[task] += 1
        instruction, answer = task(rng, False, [])
        assert not set(re.findall(r"[a-z]+", (instruction + " " + answer).lower())) & HELDOUT_WORDS, instruction
        if (phrase := _rewritten_phrase(instruction, answer)) is not None:
            lengths.add(len(phrase.split()))
            last_words.add(phrase.split()[-1].lower())
        elif m := re.fullmatch(r"How many words are in '(.+)'\?", instruction):
            assert answer == f"There are {len(m[1].split())} words." and len(m[1].split()) >= 2
        elif m := re.fullmatch(r"(?:Please count|Count up|Count) from (\d+) to (\d+)\.", instruction):
            a, b = int(m[1]), int(m[2])
            assert a >= HELDOUT_COUNT_STARTS.stop and b < 80  # next-number questions hold out 80 to 98
            assert answer == ", ".join(map(str, range(a, b + 1))) + "."
        else:
            m = re.search(r"the name (\w+) (\w+)|Say hello to (\w+) (\w+)\.", instruction)
            assert m, instruction
            name = " ".join(g for g in m.groups() if g)
            assert name in answer or name.upper() == answer or name.lower() == answer or \
                answer in name.split() or answer == "There are 2 words.", (instruction, answer)
    assert min(seen.values()) > 100
    # Phrases of lengths the phrase shapes never make (1, 4, 5, 7+), ending in made-up words as in trained ones.
    assert {1, 4, 5, 7, 8} <= lengths
    assert last_words - trained and last_words & trained


def test_copy_tasks_ask_to_repeat_exactly_their_answer(world, split):
    stream = TrainingStream(world, split, seed=10, copy_fraction=1.0)
    copies = [ex for ex in (stream.next() for _ in range(400)) if ex.instruction.startswith(
        ("Repeat after me: ", "Copy these words: ", "Repeat the list: "))]
    assert len(copies) > 40
    for ex in copies:
        listed = ex.instruction.split(": ", 1)[1]
        assert ex.response == f"[No Retrieval]{listed}[Utility:5]"
        assert 3 <= len(listed.split(", ")) <= 8


def test_heldout_questions_cover_heldout_entities_only(world, split):
    qs = heldout_questions(world, split)
    assert {q.entity_id for q in qs} == set(split.heldout_entities)
    assert any(q.heldout_phrasing for q in qs) and not all(q.heldout_phrasing for q in qs)
    for q in qs:
        assert is_relevant(world.passage_stating(q.entity_id, q.attribute), q)
        assert q.gold in q.answer


# ---- relevance labels and distractors ---------------------------------------------------------------


@pytest.mark.parametrize("namesakes", [False, True])
def test_distractors_are_never_relevant(namesakes):
    world = build_world(0, num_first_names=70, num_last_names=110) if namesakes else build_world(0)
    rng = random.Random(0)
    index = LexicalIndex.build(world.passages)
    kinds = {"same entity": 0, "look-alike name": 0}
    for e in world.entities[::7]:
        for q in questions_for(e, False):
            for p in [training_distractor(q, world, index, rng) for _ in range(4)] + \
                    retrieved_distractors(q, world, index, 4):
                assert not is_relevant(p, q)
                assert world.entity(q.entity_id).name not in p.text or p.entity_id == q.entity_id
                kinds["same entity"] += p.entity_id == q.entity_id
                kinds["look-alike name"] += p.entity_id != q.entity_id and bool(set(p.title.split()) &
                                                                                 set(e.name.split()))
    # Training shows mostly hard negatives, as a retriever returns them: namesakes where the world has any.
    assert kinds["same entity"] > 20, kinds
    assert kinds["look-alike name"] > 200 if namesakes else kinds["look-alike name"] == 0, kinds


def test_fresh_worlds_never_name_a_main_world_entity(world, split):
    held_names = {world.entity(i).name for i in split.heldout_entities}
    main_names = {e.name for e in world.entities}
    stream = TrainingStream(world, split, seed=8, new_world_questions=50)
    seen_worlds = set()
    for _ in range(1500):
        stream.next()
        if "fresh" in stream.sources:
            seen_worlds.add(stream.sources["fresh"].world.seed)
    assert len(seen_worlds) >= 2 and world.seed not in seen_worlds
    for seed in sorted(seen_worlds)[:2]:
        source = fresh_source(seed, world, held_names)
        assert source.questions
        for q in source.questions:
            assert source.world.entity(q.entity_id).name not in main_names
        for p in source.index.passages:
            assert not any(n in p.text for n in held_names)
            assert p.title not in main_names


def test_remixed_worlds_reuse_training_names_but_no_entity(world, split):
    seed = random.randrange(1, 10 ** 6)
    remix = remix_world(world, seed, split.train_entities, num_people=120)
    assert _digest(remix) == _digest(remix_world(world, seed, split.train_entities, num_people=120))
    train_people = [world.entity(i) for i in split.train_entities if world.entity(i).kind == "person"]
    train_towns = {world.entity(i).name: world.entity(i) for i in split.train_entities
                   if world.entity(i).kind == "town"}
    firsts = {e.name.split()[0] for e in train_people}
    lasts = {e.name.split()[1] for e in train_people}
    main_names = {e.name for e in world.entities}
    held_names = {world.entity(i).name for i in split.heldout_entities}
    names = [e.name for e in remix.entities]
    assert len(names) == 120 == len(set(names)) and not set(names) & main_names
    for e in remix.entities:
        first, last = e.name.split()
        assert first in firsts and last in lasts
        town = train_towns[e.attributes["birthplace"]]  # a training town, with its true country
        assert e.attributes["country"] == town.attributes["country"]
    for p in remix.passages:
        assert not any(n in p.text for n in held_names), p.text
    # Many people share a last name with another: the case the evaluation's distractors are made of.
    assert len(lasts & {n.split()[1] for n in names}) < len(names) * 0.9


def test_branch_cases_hold_one_relevant_passage(world, split):
    cases = branch_cases(world, split, 50, k=5, seed=0)
    assert len(cases) == 50
    for c in cases:
        assert len(c.passages) == 5
        assert [is_relevant(p, c.question) for p in c.passages].count(True) == 1
        assert is_relevant(c.passages[c.gold_index], c.question)
        assert c.question.entity_id in split.heldout_entities
    # The lexical ranker returns the hardest distractor there is: the entity's own other passage, when it has one.
    with_other = [c for c in cases if len(world.passages_of(c.question.entity_id)) > 1]
    assert len(with_other) > 10
    for c in with_other:
        assert sum(p.entity_id == c.question.entity_id for p in c.passages) == 2


# ---- the training format and the loss mask ---------------------------------------------------------


def _pieces(tok, ids):
    return [tok.id_to_token(i) for i in ids]


def test_example_format(world, split):
    stream = TrainingStream(world, split, seed=5)
    para = r"\[Retrieval\]<paragraph>[^\n<]+\n[^<\[]+</paragraph>"
    patterns = {
        "relevant": re.compile(para + r"\[Relevant\][^\[]+\[Fully supported\]\[Utility:5\]"),
        "irrelevant": re.compile(para + re.escape("[Irrelevant]" + IRRELEVANT_ANSWER + "[Utility:1]")),
        "no_fact": re.compile(r"\[No Retrieval\][^\[]+\[Utility:[45]\]"),
    }
    for _ in range(500):
        ex = stream.next()
        assert patterns[ex.kind].fullmatch(ex.response), ex.response
        assert ex.prompt == f"### Instruction:\n{ex.instruction}\n\n### Response:\n"
        if ex.kind == "relevant":
            answer = ex.response.split("[Relevant]")[1]
            assert ex.gold in answer


def test_loss_mask_covers_exactly_the_models_part(world, split, tokenizer):
    stream = TrainingStream(world, split, seed=6)
    ids_of = tokenizer.token_to_id
    open_id, close_id, eos = ids_of("<paragraph>"), ids_of("</paragraph>"), tokenizer.eos_id
    seen = set()
    for _ in range(300):
        ex = stream.next()
        enc = encode_example(ex, tokenizer)
        prompt_ids = tokenizer.encode(ex.prompt, add_bos=True)
        n = len(prompt_ids)
        assert enc.input_ids[:n] == prompt_ids and len(enc.loss_mask) == len(enc.input_ids)
        assert not any(enc.loss_mask[:n]), "the prompt is not a target"
        assert enc.input_ids[-1] == eos and enc.loss_mask[-1], "</s> is a target"
        targets = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
        if ex.kind == "no_fact":
            assert all(enc.loss_mask[n:])
            assert targets[0] == ids_of("[No Retrieval]")
        else:
            o, c = enc.input_ids.index(open_id), enc.input_ids.index(close_id)
            assert n < o < c
            assert all(enc.loss_mask[n:o + 1]), "[Retrieval] and <paragraph> are targets"
            assert not any(enc.loss_mask[o + 1:c + 1]), "the passage and </paragraph> are not targets"
            assert all(enc.loss_mask[c + 1:]), "everything after </paragraph> is a target"
            assert targets[:2] == [ids_of("[Retrieval]"), open_id]
            relevance = ids_of("[Relevant]") if ex.kind == "relevant" else ids_of("[Irrelevant]")
            assert targets[2] == relevance
            # The answer text round-trips through the tokenizer.
            answer = tokenizer.decode(enc.input_ids[c + 1:], skip_special_tokens=True).strip()
            assert answer == (ex.response.split("</paragraph>")[1].split("[")[1].split("]", 1)[1]).strip()
        seen.add(ex.kind)
    assert seen == {"relevant", "irrelevant", "no_fact"}


def test_world_tokenizer_layout_matches_transformers(tmp_path, world, split, tokenizer):
    from tests.helpers import slow_llama_tokenizer
    from selfrag_engine.vocab import ADDED_TOKENS as SELFRAG_ADDED_TOKENS
    from selfrag_engine.tiny.train import tokenizer_sentences, write_world_tokenizer

    vocab = write_world_tokenizer(tmp_path, tokenizer_sentences(TrainingStream(world, split, seed=1), 1500), 600)
    ours = type(tokenizer).from_pretrained(tmp_path)
    hf = slow_llama_tokenizer().from_pretrained(str(tmp_path))
    assert vocab == len(hf) == ours.vocab_size
    assert [ours.token_to_id(t) for t in SELFRAG_ADDED_TOKENS] == list(range(vocab - 16, vocab))
    stream = TrainingStream(world, split, seed=7)
    for _ in range(100):
        ex = stream.next()
        text = ex.prompt + ex.response
        assert ours.encode(text, add_bos=True) == hf.encode(text)



def test_batch_weights_follow_the_loss_mask(world, split, tokenizer):
    from selfrag_engine.tiny.train import make_batch

    stream = TrainingStream(world, split, seed=9)
    encoded = [encode_example(stream.next(), tokenizer) for _ in range(24)]
    decision = {tokenizer.token_to_id(t) for t in ("[Retrieval]", "[No Retrieval]", "[Relevant]", "[Irrelevant]")}
    batch = make_batch(encoded, tokenizer.token_to_id("<pad>"), decision, decision_weight=3.0)
    assert batch.weights.shape == batch.targets.shape == (24, max(len(e.input_ids) for e in encoded) - 1)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        for j in range(1, n):
            want = (3.0 if e.input_ids[j] in decision else 1.0) if e.loss_mask[j] else 0.0
            assert batch.weights[row, j - 1] == want and batch.targets[row, j - 1] == e.input_ids[j]
        assert not batch.weights[row, n - 1:].any(), "padding is never a target"


def test_training_is_deterministic_from_its_seed_and_lowers_the_loss(world, split, tokenizer):
    from selfrag_engine.config import LlamaConfig
    from selfrag_engine.tiny.train import ModelShape, TrainConfig, hf_config, new_model, new_stream, train

    shape = ModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlamaConfig.from_dict(hf_config(shape, tokenizer.vocab_size))

    def run(seed: int, steps: int):
        cfg = TrainConfig(seed=seed, steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, bucket_batches=2,
                          bf16=False)
        model = new_model(config, seed)
        stats = train(model, tokenizer, new_stream(world, split, cfg, seed), cfg)
        return {n: p.detach().clone() for n, p in model.state_dict().items()}, stats

    first, start = run(0, 6)
    again, _ = run(0, 6)
    other, _ = run(1, 6)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    # From about ln(vocab) at initialization, a hundred steps learn at least the frequent tokens.
    assert start["final_loss"] > 0.9 * math.log(tokenizer.vocab_size), start
    _, stats = run(0, 100)
    assert stats["final_loss"] < 0.75 * start["final_loss"], (start, stats)


def test_bf16_autocast_is_chosen_only_where_the_cpu_multiplies_bf16_natively(tmp_path):
    from selfrag_engine.tiny.train import bf16_is_native

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n")
    assert not bf16_is_native(info)
    for flag in ("avx512_bf16", "amx_bf16"):
        info.write_text(f"flags\t\t: fpu sse2 avx2 avx512f {flag} avx512_vnni\n")
        assert bf16_is_native(info)
    assert not bf16_is_native(tmp_path / "missing")
