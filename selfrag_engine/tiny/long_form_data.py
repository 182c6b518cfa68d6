"""Long-form Self-RAG examples from the synthetic world: "Tell me about X" answered segment by segment.

An answer states every attribute of the entity in 2 to 4 sentences, each sentence stating facts of ONE passage
(the person's main passage or the passage saying where they moved; a town's one passage). The response is
written in the format of Self-RAG's long-form training data (its `postprocess_data.py` builds it sentence by
sentence, with nothing between the pieces):

- the first sentence, and every sentence written from a passage other than the previous sentence's:
  `[Retrieval]<paragraph>{title}\\n{text}</paragraph>[Relevant]{sentence}[Fully supported]`, or
  `[Partially supported]` where the sentence also repeats a fact only an earlier passage stated;
- a sentence that goes on from the previous sentence's passage, one of:
  `[Continue to Use Evidence]{sentence}` (no grounding token, as in the data), `[No Retrieval]{sentence}`,
  the same passage retrieved again (`[Retrieval]<paragraph>..</paragraph>[Relevant]{sentence}[Fully supported]`),
  or a distractor retrieved and judged `[Retrieval]<paragraph>..</paragraph>[Irrelevant]{sentence}` (the
  sentence is still written, from the evidence already read);
- the answer ends `[Utility:5]` (`</s>` is added by `encode_example`).

Asked about an entity and shown only a distractor, the answer is
`[Retrieval]<paragraph>..</paragraph>[Irrelevant]I don't know.[Utility:1]`.

Why each form is needed by the engine's tree (`selfrag.long_form`): a segment ends where the model writes a
retrieval-group token. With the paper flavour's threshold, `[Continue to Use Evidence]` passes the segment gate
((p(Ret) + p(Continue)) / (p(Ret) + p(NoRet))), so the node expands and every child gets a passage in its
place: the child holding the same passage again must go on with the next sentence (the "retrieved again"
form), the children holding a distractor must say `[Irrelevant]` (the distractor form), and the child holding
the person's other passage goes on from it. Without a threshold only `[Retrieval]` expands, and the model goes
on after `[Continue to Use Evidence]` itself (the continuation form).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from selfrag_engine.selfrag.prompts import format_passage
from selfrag_engine.tiny.training_data import (
    IRRELEVANT_ANSWER,
    Example,
    LexicalIndex,
    Split,
)
from selfrag_engine.tiny.world import Entity, World, WorldPassage, with_article

# entity kind -> (phrasings used in training, phrasings kept for evaluation only)
LONG_FORM_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # An 850-step run wrote several segments for 26 of 26 requests in training phrasings but for only 5 of
    # 14 in held-out ones, hence many phrasings.
    "person": (("Tell me about {name}.", "Write a short biography of {name}.", "Tell me a bio of {name}.",
                "Who is {name}?", "Write a few sentences about {name}.", "Tell me everything you know about {name}.",
                "Give me a biography of {name}.", "Write a paragraph about {name}.", "Describe {name}."),
               ("What do you know about {name}?", "Give me a short bio of {name}.")),
    "town": (("Describe the town of {name}.", "Tell me about the town of {name}.", "Tell me about {name}.",
              "Write a few sentences about {name}.", "Tell me everything you know about {name}.",
              "Write a paragraph about the town of {name}.", "Give me an overview of {name}.",
              "Describe {name}."),
             ("What can you tell me about the town of {name}?", "Give me a description of {name}.")),
}

# The order a case lists an entity's facts in (the evaluation's cases; training shuffles it).
FACT_ORDER: dict[str, tuple[str, ...]] = {
    "person": ("occupation", "country", "birthplace", "birth_year", "residence"),
    "town": ("country", "founded", "river"),
}

MIN_SEGMENTS, MAX_SEGMENTS = 2, 4

# One sentence per group of attributes it states ({S}: the entity's name in the first sentence, its pronoun
# after). Each sentence states exactly the attributes of its key, which one passage of the entity states.
SENTENCES: dict[str, dict[tuple[str, ...], str]] = {
    "person": {
        ("occupation", "country"): "{S} is {a_occupation} from {country}.",
        ("birthplace", "birth_year"): "{S} was born in {birthplace} in {birth_year}.",
        ("occupation",): "{S} is {a_occupation}.",
        ("country",): "{S} is from {country}.",
        ("birthplace",): "{S} was born in {birthplace}.",
        ("birth_year",): "{S} was born in {birth_year}.",
        ("residence",): "{S} later moved to {residence}.",
    },
    "town": {
        ("country", "river"): "{S} is a town in {country} on the {river} river.",
        ("founded", "river"): "{S} was founded in {founded} on the {river} river.",
        ("country", "founded"): "{S} is a town in {country}, founded in {founded}.",
        ("country",): "{S} is a town in {country}.",
        ("founded",): "{S} was founded in {founded}.",
        ("river",): "{S} lies on the {river} river.",
    },
}
# A sentence about where a person moved that also repeats the birthplace, which only the main passage states:
# partly supported by the passage it is written from.
PARTIAL_RESIDENCE = "{S} later moved from {birthplace} to {residence}."

# How a sentence going on from the previous sentence's passage is marked (shares of such sentences).
# `[Continue to Use Evidence]` is the likeliest token there, so that greedy decoding writes it: the paper
# flavour's segment gate expands on it as on `[Retrieval]`, and a decoding that runs to the end without
# stopping (the released flavour's children) goes on from the passage instead of opening one it must invent.
CONTINUATIONS: tuple[tuple[str, float], ...] = (
    ("continue", 0.50),      # [Continue to Use Evidence]{sentence}
    ("again", 0.25),         # the same passage retrieved again, [Relevant]{sentence}[Fully supported]
    ("irrelevant", 0.15),    # a distractor retrieved, [Irrelevant]{sentence}
    ("no_retrieval", 0.10),  # [No Retrieval]{sentence}
)
PARTIAL_SHARE = 0.35  # of the residence sentences written after the birthplace was stated


@dataclass(frozen=True)
class Fact:
    """One fact a segment states, and the passage that states it."""
    attribute: str
    value: str
    passage: WorldPassage


@dataclass
class LongFormCase:
    entity: Entity
    instruction: str
    facts: list[Fact]              # the facts a good answer states, in segment order
    passages: list[WorldPassage]   # what retrieval hands the model: every passage of `facts` plus distractors
    heldout_phrasing: bool = False

    @property
    def distractors(self) -> list[WorldPassage]:
        return [p for p in self.passages if p.entity_id != self.entity.id]


@dataclass(frozen=True)
class PlannedSegment:
    """One sentence of a long-form training answer, with how it is introduced."""
    form: str                     # "retrieval" | "continue" | "again" | "irrelevant" | "no_retrieval"
    shown: WorldPassage | None    # the passage retrieved before it (None: continue / no_retrieval)
    facts: tuple[Fact, ...]       # the attributes it states that no earlier sentence stated
    sentence: str
    grounding: str | None         # "[Fully supported]" / "[Partially supported]" after a relevant passage

    def render(self) -> str:
        if self.form == "continue":
            return "[Continue to Use Evidence]" + self.sentence
        if self.form == "no_retrieval":
            return "[No Retrieval]" + self.sentence
        assert self.shown is not None
        paragraph = format_passage(self.shown.title, self.shown.text)
        if self.form == "irrelevant":
            return paragraph + "[Irrelevant]" + self.sentence
        return paragraph + "[Relevant]" + self.sentence + (self.grounding or "")


# ---- cases --------------------------------------------------------------------------------------------


def entity_facts(world: World, entity: Entity) -> list[Fact]:
    """Every attribute of the entity, with the passage stating it, in `FACT_ORDER`."""
    return [Fact(a, entity.attributes[a], world.passage_stating(entity.id, a))
            for a in FACT_ORDER[entity.kind] if a in entity.attributes]


def long_form_negatives(entity: Entity, pool: list[WorldPassage]) -> list[WorldPassage]:
    """Passages that say nothing about the entity: about another entity, and not naming it (a person born in
    the asked town names the town and may state its country in passing, so it is neither label)."""
    return [p for p in pool if p.entity_id != entity.id and entity.name not in p.text]


def long_form_cases(world: World, split: Split, n: int | None = None, seed: int = 0,
                    k: int = 5) -> list[LongFormCase]:
    """Long-form requests about the held-out entities, as the evaluation asks them: each held-out entity once
    in a training phrasing and once in a held-out one, with its own passages and the distractors a lexical
    retriever over the whole corpus ranks highest for the request, k passages in all, shuffled. The first n
    of them in a seeded order (all by default)."""
    rng = random.Random(seed)
    index = LexicalIndex.build(world.passages)
    cases = []
    for eid in split.heldout_entities:
        entity = world.entity(eid)
        train_forms, heldout_forms = LONG_FORM_PROMPTS[entity.kind]
        for heldout, forms in ((False, train_forms), (True, heldout_forms)):
            instruction = rng.choice(forms).format(name=entity.name)
            own = world.passages_of(entity.id)
            allowed = {id(p) for p in long_form_negatives(entity, world.passages)}
            distractors = [p for p in index.rank(instruction) if id(p) in allowed][:max(0, k - len(own))]
            passages = own + distractors
            rng.shuffle(passages)
            cases.append(LongFormCase(entity, instruction, entity_facts(world, entity), passages, heldout))
    rng.shuffle(cases)
    return cases if n is None else cases[:n]


def _shuffled_facts(facts: list[Fact], kind: str, rng: random.Random) -> list[Fact]:
    """The facts in a random order that can still be said in at most MAX_SEGMENTS sentences: cut into units
    (pairs one sentence states, single facts), the units shuffled."""
    by_attr = {f.attribute: f for f in facts}
    pairs = [key for key in SENTENCES[kind] if len(key) == 2 and all(a in by_attr for a in key)
             and len({by_attr[a].passage for a in key}) == 1]
    while True:
        units: list[list[Fact]] = []
        left = [f.attribute for f in facts]
        for key in rng.sample(pairs, len(pairs)):
            if all(a in left for a in key) and rng.random() < 0.7:
                units.append([by_attr[a] for a in key])
                left = [a for a in left if a not in key]
        units += [[by_attr[a]] for a in left]
        if MIN_SEGMENTS <= len(units) <= MAX_SEGMENTS:
            rng.shuffle(units)
            return [f for unit in units for f in unit]


def training_case(world: World, entity: Entity, index: LexicalIndex, rng: random.Random,
                  k: int = 5) -> LongFormCase:
    """A training request about `entity` (a training phrasing), its facts in a random order, and distractors
    from the passages `index` may show: half among the lexical neighbours of the request (namesakes, in worlds
    that have them), half any."""
    instruction = rng.choice(LONG_FORM_PROMPTS[entity.kind][0]).format(name=entity.name)
    facts = _shuffled_facts(entity_facts(world, entity), entity.kind, rng)
    own = world.passages_of(entity.id)
    negatives = long_form_negatives(entity, index.passages)
    allowed = {id(p) for p in negatives}
    near = [p for p in index.rank(instruction)[:3 * k] if id(p) in allowed]
    distractors: list[WorldPassage] = []
    while len(distractors) < max(1, k - len(own)):
        p = rng.choice(near) if near and rng.random() < 0.5 else rng.choice(negatives)
        if p not in distractors:
            distractors.append(p)
    passages = own + distractors
    rng.shuffle(passages)
    return LongFormCase(entity, instruction, facts, passages, False)


# ---- examples -----------------------------------------------------------------------------------------


def demo_requests(world: World, split: Split, seed: int = 7) -> list[dict]:
    """Long-form requests for demos (examples.json's `long_form`): held-out entities asked in training wordings,
    a person with two passages first, then another person, then a town; each with the facts a good answer
    states: `{"instruction", "entity", "facts": {attribute: value}}`."""
    cases = [c for c in long_form_cases(world, split, seed=seed) if not c.heldout_phrasing]
    cases.sort(key=lambda c: (c.entity.kind != "person", -len({f.passage.id for f in c.facts})))
    chosen = cases[:2] + [next(c for c in cases if c.entity.kind == "town")]
    return [{"instruction": c.instruction, "entity": c.entity.name, "facts": {f.attribute: f.value for f in c.facts}}
            for c in chosen]


def _groups(case: LongFormCase, rng: random.Random) -> list[list[Fact]]:
    """The facts cut into 2 to 4 sentences, in order; two neighbours share a sentence only when one passage
    states both and a sentence states that pair."""
    table = SENTENCES[case.entity.kind]

    def pairs_with(a: Fact, b: Fact) -> bool:
        return a.passage == b.passage and any(set(key) == {a.attribute, b.attribute} for key in table)

    facts = case.facts
    for attempt in range(32):
        merge_p = 0.5 if attempt < 16 else 1.0
        groups: list[list[Fact]] = []
        i = 0
        while i < len(facts):
            if i + 1 < len(facts) and pairs_with(facts[i], facts[i + 1]) and rng.random() < merge_p:
                groups.append([facts[i], facts[i + 1]])
                i += 2
            else:
                groups.append([facts[i]])
                i += 1
        if MIN_SEGMENTS <= len(groups) <= MAX_SEGMENTS:
            return groups
    raise ValueError(f"the facts of {case.entity.name!r} cannot be said in {MIN_SEGMENTS} to {MAX_SEGMENTS} "
                     f"sentences in this order: {[f.attribute for f in facts]}")


def _sentence(entity: Entity, group: list[Fact], first: bool, partial: bool) -> str:
    key = next(key for key in SENTENCES[entity.kind] if set(key) == {f.attribute for f in group})
    template = PARTIAL_RESIDENCE if partial else SENTENCES[entity.kind][key]
    values = dict(entity.attributes)
    subject = entity.name if first else entity.pronoun.capitalize()
    a_occupation = with_article(values["occupation"]) if "occupation" in values else ""
    return template.format(S=subject, a_occupation=a_occupation, **values)


def plan_segments(case: LongFormCase, rng: random.Random) -> list[PlannedSegment]:
    """The answer's sentences with how each is introduced (see the module doc)."""
    distractors = case.distractors
    segments: list[PlannedSegment] = []
    stated: set[str] = set()
    previous: WorldPassage | None = None
    for i, group in enumerate(_groups(case, rng)):
        passage = group[0].passage
        attrs = {f.attribute for f in group}
        partial = (attrs == {"residence"} and "birthplace" in stated and rng.random() < PARTIAL_SHARE)
        sentence = _sentence(case.entity, group, i == 0, partial)
        grounding = "[Partially supported]" if partial else "[Fully supported]"
        if previous is None or passage != previous:
            form = "retrieval"
        else:
            r, form = rng.random(), CONTINUATIONS[-1][0]
            for name, share in CONTINUATIONS:
                if r < share:
                    form = name
                    break
                r -= share
            if form == "irrelevant" and not distractors:
                form = "continue"
        shown = {"retrieval": passage, "again": passage,
                 "irrelevant": rng.choice(distractors) if form == "irrelevant" else None}.get(form)
        segments.append(PlannedSegment(form, shown, tuple(group), sentence,
                                       grounding if form in ("retrieval", "again") else None))
        stated |= attrs
        previous = passage
    return segments


def long_form_example(case: LongFormCase, rng: random.Random) -> Example:
    """The training target for a case, in Self-RAG's long-form format (see the module doc)."""
    response = "".join(s.render() for s in plan_segments(case, rng)) + "[Utility:5]"
    return Example(case.instruction, response, "long_form")


def long_form_irrelevant_example(case: LongFormCase, rng: random.Random) -> Example:
    """The case's request shown one of its distractors only: nothing can be said about the entity."""
    shown = rng.choice(case.distractors)
    response = (format_passage(shown.title, shown.text) + "[Irrelevant]" + IRRELEVANT_ANSWER + "[Utility:1]")
    return Example(case.instruction, response, "long_form_irrelevant")


def training_examples(world: World, entity: Entity, index: LexicalIndex, rng: random.Random,
                      irrelevant_share: float = 0.3) -> list[Example]:
    """A long-form training example about `entity`, followed, an `irrelevant_share` of the time, by the same
    request shown only a distractor (seeing both close together ties the relevance token to the passage)."""
    case = training_case(world, entity, index, rng)
    out = [long_form_example(case, rng)]
    if rng.random() < irrelevant_share:
        out.append(long_form_irrelevant_example(case, rng))
    return out


_SEGMENT_START = re.compile(r"(?=\[Retrieval\]|\[Continue to Use Evidence\]|\[No Retrieval\])")


def response_segments(response: str) -> list[str]:
    """A long-form response cut before each retrieval-group token (the pieces `render` wrote), the final
    utility token left on the last piece."""
    return [s for s in _SEGMENT_START.split(response) if s]
