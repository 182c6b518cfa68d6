"""A seeded fictional world written as short encyclopedia passages.

People and towns get names built from syllables, so no fact about them can come from anywhere but the
passages: a model trained on the world can only answer about an unseen person by reading a retrieved
passage. Each passage records which attributes of which entity it states, which is what decides whether a
passage is relevant to a question (see `training_data`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from selfrag_engine.retrieval.passages import Passage

ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "st", "tr", "th", "sh", "vr")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei", "ou")
CODAS = ("", "", "", "", "", "", "n", "r", "l", "s", "th", "m", "k", "nd", "rn")
COUNTRY_SUFFIXES = ("ia", "ania", "or", "land")

OCCUPATIONS = ("painter", "composer", "poet", "architect", "sculptor", "physician", "engineer", "novelist",
               "astronomer", "botanist", "chemist", "historian", "violinist", "cartographer", "merchant",
               "philosopher", "mathematician", "singer", "dancer", "blacksmith", "weaver", "potter", "sailor",
               "judge")

PERSON_ATTRIBUTES = ("birthplace", "birth_year", "occupation", "country", "residence")
TOWN_ATTRIBUTES = ("country", "founded", "river")

# Each template states every attribute listed with it, and no other attribute of the entity.
_PERSON_MAIN = (
    "{name} (born {birth_year}) is {a_occupation} from {country}. {Pron} was born in {birthplace}.",
    "{name} is {a_occupation} from {country}. {Pron} was born in {birthplace} in {birth_year}.",
    "{name} was born in {birthplace}, {country}, in {birth_year}. {Pron} is known as {a_occupation}.",
    "Born in {birth_year} in the town of {birthplace}, {name} is {a_occupation} from {country}.",
)
_PERSON_MOVE = (
    "In {move_year}, {name} moved to {residence}. {Pron} lived there for {years} years.",
    "{name} moved to {residence} in {move_year} and stayed there for {years} years.",
)
_TOWN = (
    "{name} is a town in {country}. It was founded in {founded} on the banks of the {river} river.",
    "{name} is a town on the {river} river in {country}. It was founded in {founded}.",
    "Founded in {founded}, {name} is a town in {country} that lies on the {river} river.",
)


@dataclass
class Entity:
    id: str
    kind: str  # "person" | "town"
    name: str
    attributes: dict[str, str]
    pronoun: str = "it"


@dataclass(frozen=True)
class WorldPassage(Passage):
    """A passage of the world, with what decides its relevance: the entity it is about and the attributes of
    that entity its text states."""
    entity_id: str = ""
    states: tuple[str, ...] = ()


@dataclass
class World:
    seed: int
    entities: list[Entity]
    passages: list[WorldPassage]
    towns: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=list)
    rivers: list[str] = field(default_factory=list)

    def entity(self, entity_id: str) -> Entity:
        return self._by_id()[entity_id]

    def passages_of(self, entity_id: str) -> list[WorldPassage]:
        return [p for p in self.passages if p.entity_id == entity_id]

    def passage_stating(self, entity_id: str, attribute: str) -> WorldPassage:
        for p in self.passages_of(entity_id):
            if attribute in p.states:
                return p
        raise KeyError(f"no passage states {attribute} of {entity_id}")

    def _by_id(self) -> dict[str, Entity]:
        cache = self.__dict__.get("_index")
        if cache is None:
            cache = self.__dict__["_index"] = {e.id: e for e in self.entities}
        return cache


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def made_up_name(rng: random.Random) -> str:
    """A first and a last name shaped like the world's people's, made up from syllables."""
    return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"


def _unique_words(rng: random.Random, n: int, taken: set[str], make, max_len: int) -> list[str]:
    out = []
    while len(out) < n:
        w = make()
        # Long names cost tokens in every example; very short ones collide with ordinary English words.
        if w in taken or not 4 <= len(w) <= max_len:
            continue
        taken.add(w)
        out.append(w)
    return out


def with_article(word: str) -> str:
    """"a sculptor", "an engineer"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def build_world(seed: int = 0, num_people: int = 360, num_towns: int = 80, num_countries: int = 8,
                num_rivers: int = 24, num_first_names: int | None = None,
                num_last_names: int | None = None) -> World:
    """The same seed always gives the same world (Python's `random.Random` is stable across versions).

    By default every person has a first and a last name no one else has. Smaller name pools
    (`num_first_names`, `num_last_names`) make namesakes: people sharing one of their two names, whom only
    the other name tells apart."""
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _unique_words(rng, num_countries, taken,
                              lambda: _word(rng, 2).rstrip("aeiou") + rng.choice(COUNTRY_SUFFIXES), 10)
    rivers = _unique_words(rng, num_rivers, taken, lambda: _word(rng, 2), 8)
    towns = _unique_words(rng, num_towns, taken, lambda: _word(rng, rng.choice((2, 2, 3))), 10)
    unique = num_first_names is None and num_last_names is None
    firsts = _unique_words(rng, num_first_names or num_people, taken, lambda: _word(rng, 2), 8)
    lasts = _unique_words(rng, num_last_names or num_people, taken, lambda: _word(rng, rng.choice((2, 3))), 10)

    entities: list[Entity] = []
    passages: list[WorldPassage] = []

    def add_passage(title: str, text: str, entity_id: str, states: tuple[str, ...]) -> None:
        passages.append(WorldPassage(title, text, str(len(passages) + 1), entity_id, states))

    town_country: dict[str, str] = {}
    for i, town in enumerate(towns):
        attrs = {"country": rng.choice(countries), "founded": str(rng.randint(850, 1850)),
                 "river": rng.choice(rivers)}
        town_country[town] = attrs["country"]
        e = Entity(f"town{i:03d}", "town", town, attrs)
        entities.append(e)
        add_passage(town, rng.choice(_TOWN).format(name=town, **attrs), e.id, TOWN_ATTRIBUTES)

    # A list, not a set: set order follows string hashing, which changes from one process to the next.
    names: list[tuple[str, str]] = list(zip(firsts, lasts)) if unique else []
    while len(names) < num_people:
        pair = (rng.choice(firsts), rng.choice(lasts))
        if pair not in names:
            names.append(pair)
    _add_people(rng, names, towns, town_country, entities, passages)
    return World(seed, entities, passages, towns, countries, rivers)


def _add_people(rng: random.Random, names: list[tuple[str, str]], towns: list[str], town_country: dict[str, str],
                entities: list[Entity], passages: list[WorldPassage], id_prefix: str = "person") -> None:
    """People with the given (first, last) names, born in `towns`, appended with their passages."""
    for i, (first, last) in enumerate(names):
        name = f"{first} {last}"
        pronoun = rng.choice(("he", "she"))
        birthplace = rng.choice(towns)
        occupation = rng.choice(OCCUPATIONS)
        attrs = {"birthplace": birthplace, "birth_year": str(rng.randint(1650, 1990)),
                 "occupation": occupation, "country": town_country[birthplace]}
        e = Entity(f"{id_prefix}{i:03d}", "person", name, attrs, pronoun)
        entities.append(e)
        text = rng.choice(_PERSON_MAIN).format(name=name, Pron=pronoun.capitalize(),
                                               a_occupation=with_article(occupation), **attrs)
        passages.append(WorldPassage(name, text, str(len(passages) + 1), e.id,
                                     ("birthplace", "birth_year", "occupation", "country")))
        # Some people have a second passage under the same title that names a different town: the hard
        # distractor that teaches relevance to depend on the attribute asked, not only on the name.
        if rng.random() < 0.4:
            residence = rng.choice([t for t in towns if t != birthplace])
            attrs["residence"] = residence
            move = {"move_year": int(attrs["birth_year"]) + rng.randint(18, 45), "years": rng.randint(2, 30)}
            text = rng.choice(_PERSON_MOVE).format(name=name, Pron=pronoun.capitalize(), residence=residence,
                                                   **move)
            passages.append(WorldPassage(name, text, str(len(passages) + 1), e.id, ("residence",)))


def remix_world(main: World, seed: int, entity_ids: list[str], num_people: int = 240) -> World:
    """New people whose first and last names are drawn from those of `entity_ids`' people in `main`, born in
    its towns among `entity_ids` (with the towns' true countries), under full names no entity of `main` has.

    Every full name is new, so nothing about these people can be remembered: as in the evaluation, the
    only way to tell one from another person sharing a first or last name is to read both names."""
    rng = random.Random(seed)
    keep = set(entity_ids)
    people = [e for e in main.entities if e.kind == "person" and e.id in keep]
    towns = [e for e in main.entities if e.kind == "town" and e.id in keep]
    firsts = sorted({e.name.split()[0] for e in people})
    lasts = sorted({e.name.split()[1] for e in people})
    taken = {e.name for e in main.entities}
    names: list[tuple[str, str]] = []
    while len(names) < num_people:
        pair = (rng.choice(firsts), rng.choice(lasts))
        if f"{pair[0]} {pair[1]}" not in taken:
            taken.add(f"{pair[0]} {pair[1]}")
            names.append(pair)
    entities: list[Entity] = []
    passages: list[WorldPassage] = []
    _add_people(rng, names, [t.name for t in towns], {t.name: t.attributes["country"] for t in towns},
                entities, passages, id_prefix="remix")
    return World(seed, entities, passages, [t.name for t in towns], list(main.countries), list(main.rivers))
