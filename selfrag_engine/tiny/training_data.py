"""Self-RAG training examples from the synthetic world, and the held-out split used to evaluate.

Three kinds of example, all in the published model's output format (`[...]` tokens, `</s>` as the EOS id):

- relevant: a question about an entity's attribute with the passage stating it:
  `[Retrieval]<paragraph>{title}\\n{text}</paragraph>[Relevant]{answer}[Fully supported][Utility:5]</s>`
- irrelevant: the same kind of question with a passage that does not state that attribute of that entity
  (another entity, a look-alike name, or the entity's other passage):
  `[Retrieval]<paragraph>{title}\\n{text}</paragraph>[Irrelevant]I don't know.[Utility:1]</s>`.
  No grounding token follows `[Irrelevant]`, as in Self-RAG's data, so such a branch scores 0 on grounding;
  the answer refuses because the model has no other source for a fictional fact.
- no_fact: an instruction that needs no evidence (arithmetic, greetings, rewriting, counting, tasks on a
  name that ask nothing about the named entity): `[No Retrieval]{answer}[Utility:5]</s>` (4 for chit-chat).

Loss masking follows Self-RAG's fine-tuning: the prompt is not a target; the passage body and
`</paragraph>` are not targets (the engine inserts retrieved text there); `[Retrieval]` and `<paragraph>`
are targets, so the model learns to ask for evidence at the first position and to open the paragraph the
engine fills in; everything after `</paragraph>` through `</s>` is a target.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

from selfrag_engine.selfrag.prompts import (
    PARAGRAPH_CLOSE,
    PARAGRAPH_OPEN,
    format_passage,
    format_prompt,
)
from selfrag_engine.tiny.world import (
    Entity,
    World,
    WorldPassage,
    build_world,
    made_up_name,
    remix_world,
    with_article,
)

# The world the committed model is trained on, and its held-out split.
WORLD_SEED = 0
HELDOUT_FRACTION = 0.15
SPLIT_SEED = 0

IRRELEVANT_ANSWER = "I don't know."

# (attribute, phrasings used in training, phrasings kept for evaluation only)
PERSON_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "birthplace": (("Where was {name} born?", "In which town was {name} born?",
                    "What is the birthplace of {name}?", "Name the town where {name} was born."),
                   ("Which town is the birthplace of {name}?",)),
    "birth_year": (("When was {name} born?", "In what year was {name} born?",
                    "What is the birth year of {name}?", "In which year was {name} born?"),
                   ("What year was {name} born in?",)),
    "occupation": (("What is the occupation of {name}?", "What does {name} do for a living?",
                    "What is {name}'s profession?", "What kind of work does {name} do?"),
                   ("What is the job of {name}?",)),
    "country": (("Which country is {name} from?", "What country does {name} come from?",
                 "What is the home country of {name}?"),
                ("From which country is {name}?",)),
    "residence": (("Where did {name} move to?", "Which town did {name} move to?",
                   "In which town did {name} later live?"),
                  ("To which town did {name} move?",)),
}
TOWN_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "country": (("In which country is {name}?", "Which country is {name} in?", "Where is the town of {name}?"),
                ("In what country is the town of {name}?",)),
    "founded": (("When was {name} founded?", "In what year was {name} founded?",
                 "What is the founding year of {name}?"),
                ("In which year was the town of {name} founded?",)),
    "river": (("Which river flows through {name}?", "On which river does {name} lie?", "What river is {name} on?"),
              ("Which river runs through the town of {name}?",)),
}
ANSWERS: dict[tuple[str, str], str] = {
    ("person", "birthplace"): "{name} was born in {value}.",
    ("person", "birth_year"): "{name} was born in {value}.",
    ("person", "occupation"): "{name} is {a_value}.",
    ("person", "country"): "{name} is from {value}.",
    ("person", "residence"): "{name} moved to {value}.",
    ("town", "country"): "{name} is in {value}.",
    ("town", "founded"): "{name} was founded in {value}.",
    ("town", "river"): "{name} lies on the {value} river.",
}

ADJECTIVES = ("red", "green", "blue", "quiet", "happy", "small", "big", "old", "new", "bright", "dark", "warm",
              "cold", "soft", "fast", "slow", "tall", "sweet", "loud", "calm", "brave", "early", "yellow", "wild")
NOUNS = ("apple", "house", "garden", "window", "song", "bird", "cat", "dog", "tree", "book", "road", "cloud",
         "stone", "boat", "lamp", "door", "table", "city", "friend", "morning", "letter", "flower", "horse",
         "bridge")
# Words that appear in no training phrase, so evaluation can ask to rewrite text the model never saw.
HELDOUT_WORDS = frozenset({"yellow", "wild", "horse", "bridge", "calm", "letter"})

CHAT = {  # instruction -> (answer, utility)
    "Hello!": "Hello! How can I help you today?",
    "Hi!": "Hello! How can I help you today?",
    "Good morning!": "Good morning! How can I help you today?",
    "Hi, how are you?": "I am fine, thank you. How can I help you?",
    "How are you today?": "I am fine, thank you. How can I help you?",
    "Thank you!": "You are welcome!",
    "Thanks for your help.": "You are welcome!",
    "Goodbye!": "Goodbye! Have a nice day.",
    "See you later!": "Goodbye! Have a nice day.",
    "Who are you?": "I am a small assistant that reads passages to answer questions.",
    "What can you do?": "I can answer questions about people and towns by reading passages.",
    "Hey!": "Hello! How can I help you today?",
    "Good afternoon!": "Good afternoon! How can I help you today?",
    "Nice to meet you!": "Nice to meet you too! How can I help you?",
    "Many thanks!": "You are welcome!",
    "Bye!": "Goodbye! Have a nice day.",
    "Have a nice day!": "Thank you, you too!",
}
HELDOUT_CHAT = {
    "Hey there!": "Hello! How can I help you today?",
    "Good evening!": "Good evening! How can I help you today?",
    "Thanks a lot!": "You are welcome!",
    "Bye for now!": "Goodbye! Have a nice day.",
}


class TextTokenizer(Protocol):
    eos_id: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def token_to_id(self, token: str) -> int: ...


@dataclass
class Question:
    text: str
    entity_id: str
    attribute: str
    gold: str      # the attribute value, which a correct answer contains
    answer: str    # the full answer sentence used as the training target
    heldout_phrasing: bool = False


@dataclass
class Example:
    instruction: str
    response: str  # the model's side, passage included, without the final </s> (added as the EOS id)
    kind: str      # "relevant" | "irrelevant" | "no_fact"
    gold: str = ""
    task: str = ""  # of a no_fact example: the task that made it ("add", "h_add" for its held-out wording, ...)

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction)


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[i]: token i is a target, predicted from tokens[:i]


@dataclass
class Split:
    train_entities: list[str]
    heldout_entities: list[str]

    def is_heldout(self, entity_id: str) -> bool:
        return entity_id in set(self.heldout_entities)


def split_world(world: World, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED) -> Split:
    """Holds out a fraction of the people and of the towns; their passages never appear in training."""
    rng = random.Random(seed)
    train, held = [], []
    for kind in ("person", "town"):
        ids = [e.id for e in world.entities if e.kind == kind]
        rng.shuffle(ids)
        n = round(len(ids) * heldout_fraction)
        held += sorted(ids[:n])
        train += sorted(ids[n:])
    return Split(train, held)


# ---- questions ---------------------------------------------------------------------------------------


def questions_for(entity: Entity, heldout_phrasings: bool) -> list[Question]:
    """Every question about the entity's attributes, in the training or in the held-out phrasings."""
    table = PERSON_QUESTIONS if entity.kind == "person" else TOWN_QUESTIONS
    out = []
    for attribute, (train_forms, heldout_forms) in table.items():
        if attribute not in entity.attributes:
            continue
        value = entity.attributes[attribute]
        answer = ANSWERS[(entity.kind, attribute)].format(name=entity.name, value=value, a_value=with_article(value))
        for form in (heldout_forms if heldout_phrasings else train_forms):
            out.append(Question(form.format(name=entity.name), entity.id, attribute, value, answer,
                                heldout_phrasings))
    return out


def is_relevant(passage: WorldPassage, question: Question) -> bool:
    """A passage is relevant when it states the asked attribute of the asked entity."""
    return passage.entity_id == question.entity_id and question.attribute in passage.states


def is_ambiguous(passage: WorldPassage, question: Question, world: World) -> bool:
    """A passage about another entity that mentions the asked one (a person born in the asked town) may
    state the asked fact in passing: neither label is right, so such passages are never used as negatives."""
    return passage.entity_id != question.entity_id and world.entity(question.entity_id).name in passage.text


# ---- a lexical ranker, to pick the distractors a retriever would return -------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class LexicalIndex:
    passages: list[WorldPassage]
    idf: dict[str, float]
    bags: list[Counter]

    @classmethod
    def build(cls, passages: list[WorldPassage]) -> "LexicalIndex":
        bags = [Counter(_words(p.title + " " + p.text)) for p in passages]
        df = Counter(w for bag in bags for w in bag)
        n = len(passages)
        return cls(passages, {w: math.log(1 + n / c) for w, c in df.items()}, bags)

    def rank(self, query: str) -> list[WorldPassage]:
        q = set(_words(query))
        scores = [sum(self.idf.get(w, 0.0) for w in q if w in bag) for bag in self.bags]
        order = sorted(range(len(self.passages)), key=lambda i: (-scores[i], i))
        return [self.passages[i] for i in order]


def _negatives(question: Question, world: World, pool: list[WorldPassage]) -> list[WorldPassage]:
    return [p for p in pool if not is_relevant(p, question) and not is_ambiguous(p, question, world)]


def retrieved_distractors(question: Question, world: World, index: LexicalIndex, k: int) -> list[WorldPassage]:
    """The k non-relevant passages a lexical retriever ranks highest for the question (evaluation)."""
    allowed = {id(p) for p in _negatives(question, world, index.passages)}
    return [p for p in index.rank(question.text) if id(p) in allowed][:k]


def training_distractor(question: Question, world: World, index: LexicalIndex, rng: random.Random) -> WorldPassage:
    """One non-relevant passage for training, mostly hard ones, since a retriever returns hard ones: the
    entity's other passage, a person sharing the first or the last name (in worlds that have namesakes), a
    lexical neighbour; sometimes any passage. A kind with no candidate falls through to the next."""
    ok = _negatives(question, world, index.passages)
    ok_ids = {id(p) for p in ok}
    name = world.entity(question.entity_id).name
    parts = name.split()

    def namesakes() -> list[WorldPassage]:
        return [p for p in ok if p.title != name and set(p.title.split()) & set(parts)]

    r = rng.random()
    kinds = [
        (0.2, lambda: [p for p in ok if p.entity_id == question.entity_id]),
        (0.5, namesakes),
        (0.9, lambda: [p for p in index.rank(question.text)[:8] if id(p) in ok_ids]),
    ]
    for upper, candidates in kinds:
        if r < upper:
            cands = candidates()
            if cands:
                return rng.choice(cands)
    return rng.choice(ok)


# ---- instructions that need no facts ---------------------------------------------------------------


def _heldout_pair(a: int, b: int) -> bool:
    # Symmetric, so that reordering a pair (subtraction puts the larger first) keeps it on its side.
    return (a + 1) * (b + 1) % 10 == 4


def _phrase(rng: random.Random, heldout: bool) -> str:
    def pick(words: tuple[str, ...]) -> str:
        return rng.choice([w for w in words if heldout or w not in HELDOUT_WORDS])

    shape = rng.randrange(3)
    if shape == 0:
        words = [pick(ADJECTIVES), pick(NOUNS)]
    elif shape == 1:
        words = ["the", pick(ADJECTIVES), pick(NOUNS)]
    else:
        words = ["a", pick(ADJECTIVES), pick(NOUNS), "and", "a", pick(NOUNS)]
    text = re.sub(r"\ba (?=[aeiou])", "an ", " ".join(words))
    if heldout and not set(text.split()) & HELDOUT_WORDS:
        text += " " + rng.choice(sorted(HELDOUT_WORDS & set(NOUNS)))
    return text


def _numbers(rng: random.Random, hi: int, heldout: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if _heldout_pair(a, b) == heldout:
            return a, b


Task = Callable[[random.Random, bool, list[str]], tuple[str, str]]


def _addition(rng: random.Random, a: int, b: int) -> tuple[str, str]:
    form = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
                       "Calculate {a} plus {b}.", "Tell me the sum of {a} and {b}.",
                       "What do you get when you add {a} and {b}?"])
    return form.format(a=a, b=b), f"{a} + {b} = {a + b}."


def _subtraction(rng: random.Random, a: int, b: int) -> tuple[str, str]:
    a, b = sorted((a, b), reverse=True)
    form = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "Calculate {a} minus {b}.",
                       "Take {b} away from {a}."])
    return form.format(a=a, b=b), f"{a} - {b} = {a - b}."


def _add(rng, held, names):
    return _addition(rng, *_numbers(rng, 20, held))


def _sub(rng, held, names):
    return _subtraction(rng, *_numbers(rng, 20, held))


def _mul(rng, held, names):
    a, b = _numbers(rng, 10, held)
    form = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} times {b}.",
                       "What do you get when you multiply {a} by {b}?"])
    return form.format(a=a, b=b), f"{a} x {b} = {a * b}."


def _chat(rng, held, names):
    table = HELDOUT_CHAT if held else CHAT
    q = rng.choice(sorted(table))
    return q, table[q]


def _repeating(rng: random.Random, p: str) -> tuple[str, str]:
    forms = ["Repeat the phrase: {p}", "Repeat after me: {p}", "Please repeat: {p}", "Copy this text: {p}",
             "Say this back to me: {p}", "Write this again: {p}"]
    return rng.choice(forms).format(p=p), p


def _uppercasing(rng: random.Random, p: str) -> tuple[str, str]:
    forms = ["Write '{p}' in capital letters.", "Convert to uppercase: {p}", "Put '{p}' in upper case.",
             "Rewrite in capital letters: {p}", "Please write this in uppercase: {p}"]
    return rng.choice(forms).format(p=p), p.upper()


def _lowercasing(rng: random.Random, p: str) -> tuple[str, str]:
    forms = ["Convert to lowercase: {p}", "Rewrite in small letters: {p}", "Put this in lowercase: {p}"]
    return rng.choice(forms).format(p=p.upper()), p


def _numbers_from(a: int, b: int) -> str:
    return ", ".join(str(i) for i in range(a, b + 1)) + "."


def _counting(rng: random.Random, a: int) -> tuple[str, str]:
    b = a + rng.randint(2, 6)
    form = rng.choice(["Count from {a} to {b}.", "Please count from {a} to {b}.", "Count up from {a} to {b}."])
    return form.format(a=a, b=b), _numbers_from(a, b)


def _repeat(rng, held, names):
    return _repeating(rng, _phrase(rng, held))


def _upper(rng, held, names):
    return _uppercasing(rng, _phrase(rng, held))


def _lower(rng, held, names):
    return _lowercasing(rng, _phrase(rng, held))


HELDOUT_COUNT_STARTS = range(16, 26)  # counts starting here are evaluation's only


def _heldout_count_start(rng: random.Random) -> int:
    return rng.randint(HELDOUT_COUNT_STARTS.start, HELDOUT_COUNT_STARTS.stop - 1)


def _count(rng, held, names):
    return _counting(rng, _heldout_count_start(rng) if held else rng.randint(0, HELDOUT_COUNT_STARTS.start - 1))


def _count_words(rng, held, names):
    p = _phrase(rng, held)
    n = len(p.split())
    return f"How many words are in '{p}'?", f"There are {n} words."


def _compare(rng, held, names):
    a, b = _numbers(rng, 50, held)
    while a == b:
        a, b = _numbers(rng, 50, held)
    word = rng.choice(("greater", "larger", "bigger"))
    return (f"Is {a} {word} than {b}?",
            f"Yes, {a} is {word} than {b}." if a > b else f"No, {a} is not {word} than {b}.")


def _next(rng, held, names):
    a = rng.randint(80, 98) if held else rng.randint(0, 79)
    forms = ["What number comes after {a}?", "What comes after {a}?", "Which number follows {a}?",
             "What is one more than {a}?"]
    return rng.choice(forms).format(a=a), f"{a + 1}"


def _name_task(rng, held, names):
    # A name in the instruction is not a reason to retrieve: nothing about the entity is asked. Half the
    # training names are made up on the spot, so that copying them is copying, not remembering.
    name = rng.choice(names) if held or rng.random() < 0.5 else made_up_name(rng)
    first, *_, last = name.split()
    return rng.choice([
        (f"Repeat the name {name}.", name),
        (f"Write the name {name} in capital letters.", name.upper()),
        (f"Write the name {name} in lowercase.", name.lower()),
        (f"How many words are in the name {name}?", f"There are {len(name.split())} words."),
        (f"Say hello to {name}.", f"Hello, {name}!"),
        (f"What is the first word of the name {name}?", first),
        (f"What is the last word of the name {name}?", last),
    ])


TRAIN_TASKS: tuple[Task, ...] = (_add, _sub, _mul, _chat, _repeat, _upper, _lower, _count, _count_words,
                                 _compare, _next, _name_task)


# ---- skill tasks: the training tasks' skills on wider material -------------------------------------
# Each asks a training task in a training phrasing, on material the task's own values leave out: phrases of
# one to seven words, half of them made up (copying and changing case become operations on pieces, not on a
# word list, and on lengths the phrase shapes never have), sums and differences up to 50, counts starting
# after the held-out starts. Held-out values stay out: no held-out word, number pair or count start.

TRAINED_WORDS = tuple(w for w in ADJECTIVES + NOUNS if w not in HELDOUT_WORDS)


def _free_phrase(rng: random.Random) -> str:
    words, n = [], rng.randint(1, 7)
    while len(words) < n:
        if rng.random() < 0.5:
            words.append(rng.choice(TRAINED_WORDS))
        else:
            word = made_up_name(rng).split()[rng.randrange(2)].lower()
            if word not in HELDOUT_WORDS:
                words.append(word)
    return " ".join(words)


def _repeat_free(rng, held, names):
    return _repeating(rng, _free_phrase(rng))


def _upper_free(rng, held, names):
    return _uppercasing(rng, _free_phrase(rng))


def _lower_free(rng, held, names):
    return _lowercasing(rng, _free_phrase(rng))


def _add_wide(rng, held, names):
    return _addition(rng, *_numbers(rng, 50, False))


def _sub_wide(rng, held, names):
    return _subtraction(rng, *_numbers(rng, 50, False))


def _count_wide(rng, held, names):
    return _counting(rng, rng.randint(HELDOUT_COUNT_STARTS.stop, 60))


SKILL_TASKS: tuple[Task, ...] = (_repeat_free, _upper_free, _lower_free, _add_wide, _sub_wide, _count_wide)


# ---- shape tasks: the training wordings on phrases of shapes the phrase maker never makes -------------
# Rewriting and counting tasks whose phrase has the trained shapes' articles and "and" but more or fewer words,
# words training has and made-up ones in any place (the last included), so that the answer's length and words
# come from the phrase read, not from the shapes seen. Held-out words, pairs and count starts stay out.


def _made_up_word(rng: random.Random) -> str:
    while (word := made_up_name(rng).split()[rng.randrange(2)].lower()) in HELDOUT_WORDS:
        pass
    return word


def _shaped_phrase(rng: random.Random) -> str:
    def words(n: int) -> list[str]:
        return [rng.choice(TRAINED_WORDS) if rng.random() < 0.6 else _made_up_word(rng) for _ in range(n)]

    parts = ([rng.choice(("the", "a"))] if rng.random() < 0.6 else []) + words(rng.randint(1, 4))
    if rng.random() < 0.4:
        parts += ["and", "a"] + words(rng.randint(1, 3))
    return re.sub(r"\ba (?=[aeiou])", "an ", " ".join(parts))


def _repeat_shaped(rng, held, names):
    return _repeating(rng, _shaped_phrase(rng))


def _upper_shaped(rng, held, names):
    return _uppercasing(rng, _shaped_phrase(rng))


def _lower_shaped(rng, held, names):
    return _lowercasing(rng, _shaped_phrase(rng))


def _count_words_shaped(rng, held, names):
    while len((p := _shaped_phrase(rng)).split()) < 2:
        pass
    return f"How many words are in '{p}'?", f"There are {len(p.split())} words."


def _count_decades(rng, held, names):
    # Counts across a decade past the held-out starts and below the next-number task's held-out values (80-98).
    return _counting(rng, rng.randint(HELDOUT_COUNT_STARTS.stop, 73))


def _name_made_up(rng, held, names):
    return _name_task(rng, False, [made_up_name(rng)])


SHAPE_TASKS: tuple[Task, ...] = (_repeat_shaped, _upper_shaped, _lower_shaped, _count_words_shaped, _count_decades,
                                 _name_made_up)


def _h_add(rng, held, names):
    a, b = _numbers(rng, 20, True)
    return f"How much is {a} plus {b}?", f"{a} + {b} = {a + b}."


def _h_mul(rng, held, names):
    a, b = _numbers(rng, 10, True)
    return f"What is the product of {a} and {b}?", f"{a} x {b} = {a * b}."


def _h_chat(rng, held, names):
    q = rng.choice(sorted(HELDOUT_CHAT))
    return q, HELDOUT_CHAT[q]


def _h_repeat(rng, held, names):
    p = _phrase(rng, True)
    return f"Please say this again: {p}", p


def _h_upper(rng, held, names):
    p = _phrase(rng, True)
    return f"Make this uppercase: {p}", p.upper()


def _h_count(rng, held, names):
    a = _heldout_count_start(rng)
    b = a + rng.randint(2, 6)
    return f"List the numbers from {a} to {b}.", _numbers_from(a, b)


def _h_compare(rng, held, names):
    a, b = _numbers(rng, 50, True)
    while a == b:
        a, b = _numbers(rng, 50, True)
    return (f"Is {a} smaller than {b}?",
            f"Yes, {a} is smaller than {b}." if a < b else f"No, {a} is not smaller than {b}.")


def _h_name(rng, held, names):
    name = rng.choice(names)
    return f"Say the name {name} twice.", f"{name} {name}"


# Phrasings never used in training (the training tasks with held-out values are evaluated too).
HELDOUT_TASKS: tuple[Task, ...] = (_h_add, _h_mul, _h_chat, _h_repeat, _h_upper, _h_count, _h_compare, _h_name)


def copy_task(rng: random.Random) -> tuple[str, str]:
    """Repeat 3 to 8 made-up names and years: answering is nothing but copying, the skill every world answer
    needs (an unseen person's name from the question, a value out of the passage), and these examples teach it
    many tokens at a time."""
    items = [made_up_name(rng) if rng.random() < 0.75 else str(rng.randint(850, 1990))
             for _ in range(rng.randint(3, 8))]
    text = ", ".join(items)
    return rng.choice(["Repeat after me: {t}", "Copy these words: {t}", "Repeat the list: {t}"]).format(t=text), text


def no_fact_example(rng: random.Random, names: list[str], heldout: bool = False,
                    heldout_phrasing: bool = False, copy_fraction: float = 0.0, skill_fraction: float = 0.0,
                    shape_fraction: float = 0.0) -> Example:
    """An instruction that needs no facts; a `copy_fraction` of training ones are `copy_task`s, a
    `shape_fraction` of the rest `SHAPE_TASKS`, a `skill_fraction` of the rest `SKILL_TASKS`."""
    if copy_fraction > 0 and not heldout and rng.random() < copy_fraction:
        instruction, answer = copy_task(rng)
        return Example(instruction, f"[No Retrieval]{answer}[Utility:5]", "no_fact", task="copy")
    if shape_fraction > 0 and not heldout and rng.random() < shape_fraction:
        task = rng.choice(SHAPE_TASKS)
    elif skill_fraction > 0 and not heldout and rng.random() < skill_fraction:
        task = rng.choice(SKILL_TASKS)
    else:
        task = rng.choice(HELDOUT_TASKS if heldout_phrasing else TRAIN_TASKS)
    instruction, answer = task(rng, heldout, names)
    utility = 4 if task in (_chat, _h_chat) else 5
    return Example(instruction, f"[No Retrieval]{answer}[Utility:{utility}]", "no_fact", task=task.__name__[1:])


# ---- world examples -------------------------------------------------------------------------------


def relevant_example(question: Question, passage: WorldPassage) -> Example:
    return Example(question.text, f"{format_passage(passage.title, passage.text)}[Relevant]{question.answer}"
                                  "[Fully supported][Utility:5]", "relevant", question.gold)


def irrelevant_example(question: Question, passage: WorldPassage) -> Example:
    return Example(question.text, f"{format_passage(passage.title, passage.text)}[Irrelevant]{IRRELEVANT_ANSWER}"
                                  "[Utility:1]", "irrelevant", question.gold)


@dataclass
class QuestionSource:
    """The questions of one world that training may ask, with the passages it may show for them."""
    world: World
    index: LexicalIndex  # over the passages it may show
    questions: list[Question]

    @property
    def entities(self) -> list[Entity]:
        """The entities its questions ask about, in the order of the world."""
        cache = self.__dict__.get("_entities")
        if cache is None:
            asked = {q.entity_id for q in self.questions}
            cache = self.__dict__["_entities"] = [e for e in self.world.entities if e.id in asked]
        return cache

    @classmethod
    def of(cls, world: World, excluded: set[str]) -> "QuestionSource":
        """Leaves out the entities in `excluded` and every passage about them."""
        pool = [p for p in world.passages if p.entity_id not in excluded]
        questions = [q for e in world.entities if e.id not in excluded for q in questions_for(e, False)]
        return cls(world, LexicalIndex.build(pool), questions)

    def pair(self, rng: random.Random) -> list[Example]:
        """A question with its relevant passage and with one non-relevant passage."""
        q = rng.choice(self.questions)
        return [relevant_example(q, self.world.passage_stating(q.entity_id, q.attribute)),
                irrelevant_example(q, training_distractor(q, self.world, self.index, rng))]


def fresh_source(seed: int, main: World, heldout_names: set[str]) -> QuestionSource:
    """A whole new world from `seed`, for questions about entities seen once: the model cannot answer them
    from memory, so it must learn to read the passage. Entities named like one of the main world's are left
    out (a fact about a held-out name must never be taught), and so are passages naming a held-out entity."""
    world = build_world(seed)
    taken = {e.name for e in main.entities}
    excluded = {e.id for e in world.entities if e.name in taken}
    excluded |= {p.entity_id for p in world.passages if any(n in p.text for n in heldout_names)}
    return QuestionSource.of(world, excluded)


@dataclass
class TrainingStream:
    """An endless, seeded stream of training examples that never shows a held-out entity.

    World questions come from three sources: the main world's training entities; fresh worlds with new
    names throughout (`fresh_source`, a new world every `new_world_questions` questions), about whose people
    and towns nothing can be remembered, so the model must learn to read; and, when `remix_fraction` > 0,
    remixed worlds (`remix_world`: new people named from the training people's first and last names), which
    are full of namesakes, for training on worlds whose people share names.

    A world question comes as a pair, relevant and irrelevant, one after the other: seeing the same question
    with both labels close together (length bucketing usually puts them in one batch) makes the relevance
    token's dependence on the passage the easiest thing to learn, instead of the question's wording.

    With `long_form` given (`long_form_data.training_examples`) a `long_form_fraction` of the world draws are
    long-form requests about an entity of the same sources instead ("Tell me about X", answered sentence by
    sentence from its passages), so that the long form, too, is mostly about entities seen once."""
    world: World
    split: Split
    seed: int = 0
    world_fraction: float = 0.8  # of examples; the rest need no facts
    remix_fraction: float = 0.0  # of world questions
    fresh_fraction: float = 0.7  # of world questions
    copy_fraction: float = 0.0  # of no-fact examples: made-up names and years to repeat (`copy_task`)
    skill_fraction: float = 0.0  # of the no-fact examples neither copy nor shape tasks: `SKILL_TASKS`
    shape_fraction: float = 0.0  # of the no-fact examples other than copy tasks: `SHAPE_TASKS`
    new_world_questions: int = 400
    long_form_fraction: float = 0.0  # of world draws
    # (world, entity, passages it may show, rng) -> examples; given by the caller (`long_form_data`).
    long_form: Callable[[World, Entity, "LexicalIndex", random.Random], list[Example]] | None = None

    def __post_init__(self) -> None:
        if self.long_form_fraction > 0 and self.long_form is None:
            raise ValueError("long_form_fraction > 0 needs the long_form example maker")
        held = set(self.split.heldout_entities)
        self.rng = random.Random(self.seed)
        self.main = QuestionSource.of(self.world, held)
        self.heldout_names = {self.world.entity(e).name for e in held}
        self.names = [e.name for e in self.world.entities if e.kind == "person" and e.id not in held]
        self.sources: dict[str, QuestionSource] = {}
        self.left: dict[str, int] = {}
        self.pending: list[Example] = []

    def _new_seed(self) -> int:
        seed = self.rng.randrange(1, 2 ** 31)
        while seed == self.world.seed:
            seed = self.rng.randrange(1, 2 ** 31)
        return seed

    def _source(self, kind: str) -> QuestionSource:
        if self.left.get(kind, 0) == 0:
            seed = self._new_seed()
            if kind == "fresh":
                self.sources[kind] = fresh_source(seed, self.world, self.heldout_names)
            else:
                remix = remix_world(self.world, seed, self.split.train_entities)
                self.sources[kind] = QuestionSource.of(remix, set())
            self.left[kind] = self.new_world_questions
        self.left[kind] -= 1
        return self.sources[kind]

    def next(self) -> Example:
        if self.pending:
            return self.pending.pop()
        # A world draw yields two examples, so this makes world_fraction the share of examples.
        if self.rng.random() >= self.world_fraction / (2 - self.world_fraction):
            return no_fact_example(self.rng, self.names, copy_fraction=self.copy_fraction,
                                   skill_fraction=self.skill_fraction, shape_fraction=self.shape_fraction)
        r = self.rng.random()
        if r < self.remix_fraction:
            source = self._source("remix")
        elif r < self.remix_fraction + self.fresh_fraction:
            source = self._source("fresh")
        else:
            source = self.main
        if self.long_form_fraction > 0 and self.rng.random() < self.long_form_fraction:
            assert self.long_form is not None
            examples = self.long_form(source.world, self.rng.choice(source.entities), source.index, self.rng)
            self.pending.extend(reversed(examples[1:]))
            return examples[0]
        pair = source.pair(self.rng)
        self.rng.shuffle(pair)
        self.pending.append(pair[1])
        return pair[0]


# ---- evaluation sets ---------------------------------------------------------------------------------


@dataclass
class BranchCase:
    question: Question
    passages: list[WorldPassage]  # K passages, shuffled
    gold_index: int


def heldout_questions(world: World, split: Split) -> list[Question]:
    """Every question, in every phrasing, about the held-out entities."""
    out = []
    for eid in split.heldout_entities:
        e = world.entity(eid)
        out += questions_for(e, False) + questions_for(e, True)
    return out


def heldout_instructions(world: World, split: Split, n: int, seed: int = 0) -> list[Example]:
    """No-fact instructions with values or phrasings the training never used, half of each."""
    rng = random.Random(seed)
    names = [world.entity(e).name for e in split.heldout_entities if world.entity(e).kind == "person"]
    return [no_fact_example(rng, names, heldout=True, heldout_phrasing=i % 2 == 1) for i in range(n)]


# The held-out wordings that hinge on a word no training example holds.
UNTAUGHT_WORDS = {"h_mul": "product", "h_compare": "smaller", "h_name": "twice"}


def untaught(example: Example) -> str:
    """What the answer to a held-out no-fact example hinges on that no training example shows, or "":
    "word" (a wording whose deciding word training never uses, `UNTAUGHT_WORDS`), "greeting" (a greeting
    training never answers, `HELDOUT_CHAT`), "digit fact" (a sum, difference or product of a held-out pair:
    `_heldout_pair` reads the last digits only, so no training example adds, subtracts or multiplies those two
    last digits, unless an operand ending in 0 or a factor 0, 1 or 10 makes it a rule training shows)."""
    if example.task in UNTAUGHT_WORDS:
        return "word"
    if example.task in ("chat", "h_chat"):
        return "greeting"
    if example.task in ("add", "h_add", "sub", "mul"):
        a, b = map(int, re.findall(r"\d+", example.instruction)[:2])
        if not _heldout_pair(a, b):
            return ""
        rule = {a, b} & {0, 1, 10} if example.task == "mul" else a % 10 == 0 or b % 10 == 0
        return "" if rule else "digit fact"
    return ""


def branch_cases(world: World, split: Split, n: int, k: int = 5, seed: int = 0) -> list[BranchCase]:
    """n held-out questions, each with its relevant passage and the k-1 non-relevant passages that a
    lexical retriever over the whole corpus ranks highest (same names, the entity's other passage)."""
    rng = random.Random(seed)
    questions = heldout_questions(world, split)
    rng.shuffle(questions)
    index = LexicalIndex.build(world.passages)
    cases = []
    for q in questions[:n]:
        gold = world.passage_stating(q.entity_id, q.attribute)
        passages = retrieved_distractors(q, world, index, k - 1) + [gold]
        rng.shuffle(passages)
        cases.append(BranchCase(q, passages, passages.index(gold)))
    return cases


# ---- tokenization --------------------------------------------------------------------------------


def encode_example(example: Example, tokenizer: TextTokenizer) -> Encoded:
    """Token ids of prompt + response + EOS, and which of them are training targets (see module doc)."""
    prompt_ids = tokenizer.encode(example.prompt, add_bos=True)
    ids = tokenizer.encode(example.prompt + example.response, add_bos=True) + [tokenizer.eos_id]
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the prompt does not tokenize to a prefix of the example: {example.instruction!r}")
    open_id, close_id = tokenizer.token_to_id(PARAGRAPH_OPEN), tokenizer.token_to_id(PARAGRAPH_CLOSE)
    mask = [False] * len(prompt_ids)
    inside = False
    for t in ids[len(prompt_ids):]:
        mask.append(not inside)
        if t == open_id:
            inside = True
        elif t == close_id:
            inside = False
    return Encoded(ids, mask)
