"""A procedurally generated corpus of short children's-story-like texts: the embedded default of ``data=text``.

Why a grammar instead of shipped text: the default LM run must need no download and the repository must not carry
copied prose. A small probabilistic grammar gives a corpus with learnable structure at several ranges: spelling and
punctuation (characters), fixed phrases ("Once upon a time"), agreement that spans sentences (a story keeps its
two characters, their species and pronouns, and the object it is about, so "Lily ... she ... the red kite" recur),
and dialogue in quotes. A char-level model's loss falls quickly from log(vocab) as it learns spelling, then slowly
as it learns these dependencies, which is what a quantization comparison needs to see.

Output is a pure function of (seed, target length): ``random.Random(seed)`` drives every choice.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = (("Lily", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Sara", "she"), ("Max", "he"),
         ("Anna", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"), ("Ella", "she"), ("Jack", "he"),
         ("Nora", "she"), ("Finn", "he"), ("Ruby", "she"), ("Owen", "he"))
ANIMALS = ("cat", "dog", "bird", "fox", "rabbit", "frog", "bear", "duck", "mouse", "owl", "turtle", "horse")
ADJECTIVES = ("little", "big", "happy", "brave", "shy", "kind", "curious", "sleepy", "funny", "clever", "gentle")
PLACES = (("park", "in"), ("forest", "in"), ("garden", "in"), ("little house", "in"), ("farm", "on"), ("beach", "on"),
          ("river", "by"), ("hill", "on"), ("town", "in"), ("meadow", "in"))  # (place, its preposition)
OBJECTS = ("ball", "kite", "box", "hat", "book", "cake", "flower", "stone", "key", "boat", "drum", "shell", "map")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "shiny")
SPOTS = ("under a big tree", "near the river", "in the tall grass", "behind a rock", "on the hill", "in an old box")
TIMES = ("One sunny morning", "One rainy day", "One day", "Later that day", "The next morning", "In the evening")
FEELINGS = ("happy", "excited", "surprised", "proud", "curious")
BAD_FEELINGS = ("sad", "scared", "worried", "upset")
PROBLEMS = ("the {obj} was stuck in a tree", "the wind took the {obj} away", "the {obj} fell into the water",
            "the {obj} was too heavy to carry", "the {obj} broke into two pieces")
FIXES = ("{friend} climbed up and got the {obj} back", "{friend} ran fast and caught the {obj}",
         "{friend} found a long stick and pulled the {obj} out", "they carried the {obj} together",
         "{friend} helped to fix the {obj} with some glue")
LESSONS = ("From that day on, {hero} and {friend} were best friends.", "{hero} learned that it is good to share.",
           "{hero} learned that friends help each other.", "They played with the {obj} until the sun went down.",
           "{Hpron} smiled and said thank you to {friend}.")
POSSESSIVE = {"he": "his", "she": "her"}


@dataclass(frozen=True)
class Character:
    name: str
    pronoun: str
    animal: str
    adjective: str


def generate_stories(seed: int, target_chars: int) -> str:
    """Stories separated by blank lines, stopping at the first story end after ``target_chars`` characters."""
    rng = random.Random(seed)
    stories: list[str] = []
    total = 0
    while total < target_chars:
        story = _story(rng)
        stories.append(story)
        total += len(story) + 2
    return "\n\n".join(stories) + "\n"


def _character(rng: random.Random, taken: str | None = None) -> Character:
    name, pronoun = rng.choice([n for n in NAMES if n[0] != taken])
    return Character(name, pronoun, rng.choice(ANIMALS), rng.choice(ADJECTIVES))


def _story(rng: random.Random) -> str:
    hero = _character(rng)
    friend = _character(rng, taken=hero.name)
    (place, prep), obj, color = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(COLORS)
    fill = {"hero": hero.name, "friend": friend.name, "obj": obj, "Hpron": hero.pronoun.capitalize()}
    sentences = [rng.choice((
        f"Once upon a time, there was a {hero.adjective} {hero.animal} named {hero.name}.",
        f"{hero.name} was a {hero.adjective} {hero.animal} who lived {prep} a {place}.",
    ))]
    if rng.random() < 0.7:
        sentences.append(f"{hero.pronoun.capitalize()} liked to play {prep} the {place} with "
                         f"{POSSESSIVE[hero.pronoun]} friend {friend.name} the {friend.animal}.")
    sentences.append(f"{rng.choice(TIMES)}, {hero.name} found a {color} {obj} {rng.choice(SPOTS)}.")
    if rng.random() < 0.6:
        sentences.append(f'"Look, {friend.name}!" said {hero.name}. "I found a {color} {obj}!"')
    sentences.append(f"{hero.name} was very {rng.choice(FEELINGS)}.")
    if rng.random() < 0.8:
        sentences.append(f"But {rng.choice(PROBLEMS).format(**fill)}.")
        sentences.append(f"{hero.name} felt {rng.choice(BAD_FEELINGS)}.")
        if rng.random() < 0.5:
            sentences.append(f'"Do not worry," said {friend.name}. "I will help you."')
        fix = rng.choice(FIXES).format(**fill)
        sentences.append(f"Then {fix}.")
    sentences.append(rng.choice(LESSONS).format(**fill))
    return " ".join(sentences)
