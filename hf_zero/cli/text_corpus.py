"""An English text corpus the project generates itself, so recipes run end to end with no download.

The corpus describes a small fixed world: people, each with a home town, a pet of some colour, a
favourite food and a job. Every sentence states one of those facts with one of several templates,
in random order and combination, so the text is ordinary words and punctuation with structure a
model can learn: grammar (which word class comes next) within a few steps, then the facts
themselves (which town goes with which person), which is what masked-token accuracy and
perplexity measure. The same world gives instruction/response pairs for supervised fine-tuning.
Everything is drawn from a seeded `random.Random`, so a seed names one corpus exactly.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..hub.saving import write_atomically


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NAMES = _words(
    "anna ben clara david emma felix greta hugo ida jonas karla leo mara nils olga paul rosa sam tara "
    "viktor wanda yusuf zoe amir bella carl dora emil fiona georg hanna ivan julia kurt lena max nora "
    "oskar petra quentin rita simon tilda uwe vera walter xenia yara"
)
_TOWNS = _words(
    "paris berlin vienna lisbon oslo madrid rome prague dublin athens warsaw budapest helsinki zurich "
    "porto lyon munich krakow bergen seville"
)
_ANIMALS = _words("cat dog horse rabbit parrot goat duck pony hamster turtle ferret lamb")
_COLOURS = _words("red black white brown grey golden spotted striped")
_FOODS = _words("bread cheese apples soup rice fish noodles cake beans pears honey olives")
_JOBS = _words("baker teacher doctor farmer painter pilot sailor writer cook gardener nurse builder")

_TEMPLATES = {
    "town": ("{name} lives in {town} .", "the home of {name} is {town} .", "{name} was born in {town} ."),
    "pet": (
        "{name} has a {colour} {animal} .",
        "the {animal} of {name} is {colour} .",
        "every morning {name} feeds the {colour} {animal} .",
    ),
    "food": ("{name} likes to eat {food} .", "the favourite food of {name} is {food} ."),
    "job": ("{name} works as a {job} .", "{name} is a {job} in {town} ."),
}
_QUESTIONS = {
    "town": ("where does {name} live ?", "{name} lives in {town} ."),
    "pet": ("what pet does {name} have ?", "{name} has a {colour} {animal} ."),
    "food": ("what does {name} like to eat ?", "{name} likes to eat {food} ."),
    "job": ("what is the job of {name} ?", "{name} works as a {job} ."),
}


@dataclass(frozen=True)
class Person:
    """One person of the generated world and the facts the corpus states about them."""

    name: str
    town: str
    animal: str
    colour: str
    food: str
    job: str

    def fields(self) -> dict[str, str]:
        return {
            "name": self.name,
            "town": self.town,
            "animal": self.animal,
            "colour": self.colour,
            "food": self.food,
            "job": self.job,
        }


def world(seed: int = 0) -> list[Person]:
    """The people of the world `seed` names, each with fixed facts."""
    rng = random.Random(seed)
    return [
        Person(
            name,
            rng.choice(_TOWNS),
            rng.choice(_ANIMALS),
            rng.choice(_COLOURS),
            rng.choice(_FOODS),
            rng.choice(_JOBS),
        )
        for name in _NAMES
    ]


def documents(count: int, seed: int = 0, sentences: tuple[int, int] = (3, 8)) -> list[str]:
    """`count` documents (one line each) of `sentences` (min, max) sentences about the world's people;
    a document talks about one to three people, so facts about them recur within it."""
    people = world(seed)
    rng = random.Random(seed + 1)
    lines = []
    for _ in range(count):
        cast = rng.sample(people, rng.randint(1, 3))
        text = []
        for _ in range(rng.randint(*sentences)):
            person = rng.choice(cast)
            templates = _TEMPLATES[rng.choice(tuple(_TEMPLATES))]
            text.append(rng.choice(templates).format(**person.fields()))
        lines.append(" ".join(text))
    return lines


def instructions(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` instruction/response pairs asking for the world's facts (`prompt`, `response`)."""
    people = world(seed)
    rng = random.Random(seed + 2)
    pairs = []
    for _ in range(count):
        person = rng.choice(people)
        question, answer = _QUESTIONS[rng.choice(tuple(_QUESTIONS))]
        pairs.append(
            {"prompt": question.format(**person.fields()), "response": answer.format(**person.fields())}
        )
    return pairs


def write_corpus(
    folder: str | os.PathLike, kind: str, train: int, evaluation: int, seed: int = 0
) -> dict[str, str]:
    """Write a generated corpus into `folder` as the files a user would point a recipe at: plain
    text (one document per line) for `kind="text"`, JSONL with `prompt`/`response` for
    `kind="instructions"`. Train and eval rows are drawn from one stream, so they never repeat each
    other's row order but share the world. Returns `{"train": path, "eval": path}`; files already
    there with the same content are kept (every rank may call this)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        rows = documents(train + evaluation, seed)
        suffix, lines = "txt", rows
    elif kind == "instructions":
        rows = instructions(train + evaluation, seed)
        suffix, lines = "jsonl", [json.dumps(row) for row in rows]
    else:
        raise ValueError(f"unknown generated corpus kind {kind!r}: expected 'text' or 'instructions'")
    paths = {}
    for split, part in (("train", lines[:train]), ("eval", lines[train:])):
        path = folder / f"{split}.{suffix}"
        content = "\n".join(part) + "\n"
        if not path.exists() or path.read_text() != content:
            # Written whole and renamed into place: ranks writing the same file at once never leave
            # a half-written one for another rank to read.
            write_atomically(path, lambda partial, content=content: Path(partial).write_text(content))
        paths[split] = str(path)
    return paths
