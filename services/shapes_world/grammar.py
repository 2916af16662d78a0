"""The shapes world's prompts: the grammar, its categories and the train / held-out split."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COUNTS = ("one", "two", "three")
ARTICLE = "a"
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "counting", "two_objects", "position")
SPLITS = ("train", "heldout")
CORRUPTIONS = ("recolor", "remove", "move", "reshape", "add")
# 4 of the 21 (colour, shape) pairs. Rule: COLORS[0::2] paired with SHAPES in turn. Every shape is held out
# at least once and every colour is still seen with other shapes in training, so the held-out split tests
# composition of known words, never an unseen word.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("blue", "square"), ("cyan", "triangle"), ("white", "circle"),
)
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {ARTICLE, "and", *COLORS, *SHAPES, *PLURALS.values(), *COUNTS, *(w for r in RELATIONS for w in r.split())}
))


_COUNT_OF = {ARTICLE: 1, "one": 1, "two": 2, "three": 3}


@dataclass(frozen=True)
class Spec:
    """A parsed prompt: `objects` holds (colour, shape, count); `relation` is set for position prompts."""

    category: str
    objects: tuple[tuple[str, str, int], ...]
    relation: str | None = None



def _fail(prompt: str, why: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is outside the shapes grammar: {why}")


def _parse_object(words: list[str], prompt: str) -> tuple[str, str, int, str]:
    """'<count> <colour> <shape>' -> (colour, shape, count, count word)."""
    if len(words) != 3:
        raise _fail(prompt, f"object phrase {' '.join(words)!r} should be '<count> <colour> <shape>', "
                            "e.g. 'a red circle' or 'two blue squares'")
    count_word, color, noun = words
    if count_word not in _COUNT_OF:
        raise _fail(prompt, f"expected a count, one of {(ARTICLE, *COUNTS)}, got {count_word!r}")
    if color not in COLORS:
        raise _fail(prompt, f"expected a colour, one of {COLORS}, got {color!r}")
    count = _COUNT_OF[count_word]
    nouns = SHAPES if count == 1 else tuple(PLURALS.values())
    if noun not in nouns:
        raise _fail(prompt, f"after {count_word!r} expected a shape, one of {nouns}, got {noun!r}")
    shape = noun if count == 1 else SHAPES[nouns.index(noun)]
    return color, shape, count, count_word


def _split_joiner(text: str, prompt: str) -> tuple[list[str], str | None, list[str]]:
    """Split normalised text on its one 'and' or relation -> (first words, joiner or None, second words)."""
    padded = f" {text} "
    hits = [j for j in ("and", *RELATIONS) for _ in range(padded.count(f" {j} "))]
    if len(hits) > 1:
        raise _fail(prompt, f"at most one 'and' or relation {RELATIONS} is allowed, got {hits}")
    if not hits:
        return text.split(), None, []
    first, second = padded.split(f" {hits[0]} ")
    return first.split(), hits[0], second.split()


def parse(prompt: str) -> Spec:
    """Parse a prompt (lower-cased, spaces collapsed, a trailing '.' dropped); ValueError if outside grammar."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.lower().strip().rstrip(".").split()
    if not words:
        raise _fail(prompt, "empty prompt; expected e.g. 'a red circle'")
    for w in words:
        if w not in VOCABULARY:
            raise _fail(prompt, f"unknown word {w!r}; expected a count {(ARTICLE, *COUNTS)}, colour {COLORS}, "
                                f"shape {SHAPES} (plural {tuple(PLURALS.values())}), 'and' or relation {RELATIONS}")
    first, joiner, second = _split_joiner(" ".join(words), prompt)
    color, shape, count, count_word = _parse_object(first, prompt)
    if joiner is None:
        return Spec("single" if count_word == ARTICLE else "counting", ((color, shape, count),))
    color2, shape2, _, count_word2 = _parse_object(second, prompt)
    if (count_word, count_word2) != (ARTICLE, ARTICLE):
        raise _fail(prompt, f"both objects around {joiner!r} take the article 'a', e.g. 'a red circle'")
    if (color, shape) == (color2, shape2):
        raise _fail(prompt, f"the two objects must differ, got {color} {shape} twice")
    objects = ((color, shape, 1), (color2, shape2, 1))
    return Spec("two_objects", objects) if joiner == "and" else Spec("position", objects, joiner)


def category(prompt: str) -> str:
    """The prompt's category, one of CATEGORIES."""
    return parse(prompt).category


def format_spec(spec: Spec) -> str:
    """Inverse of `parse`: the canonical prompt text of a Spec."""
    def phrase(color: str, shape: str, count: int, use_article: bool) -> str:
        if use_article:
            return f"{ARTICLE} {color} {shape}"
        return f"{COUNTS[count - 1]} {color} {shape if count == 1 else PLURALS[shape]}"

    if spec.category in ("single", "counting"):
        return phrase(*spec.objects[0], use_article=spec.category == "single")
    joiner = "and" if spec.category == "two_objects" else spec.relation
    return f" {joiner} ".join(phrase(*o, use_article=True) for o in spec.objects)


def is_heldout(prompt: str) -> bool:
    """True if the prompt mentions at least one (colour, shape) pair of HELDOUT_PAIRS."""
    return any((c, s) in HELDOUT_PAIRS for c, s, _ in parse(prompt).objects)


def _resolve(split: str, categories: tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate a split and categories (None = all); return the categories."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cats = CATEGORIES if categories is None else tuple(categories)
    if not cats or any(c not in CATEGORIES for c in cats):
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories!r}")
    return cats


@functools.cache
def _prompts(cat: str, split: str) -> tuple[str, ...]:
    pairs = list(itertools.product(COLORS, SHAPES))
    if cat == "single":
        specs = [Spec(cat, ((c, s, 1),)) for c, s in pairs]
    elif cat == "counting":
        specs = [Spec(cat, ((c, s, n),)) for c, s in pairs for n in (2, 3)]
    elif cat == "two_objects":
        specs = [Spec(cat, ((*a, 1), (*b, 1))) for a, b in itertools.permutations(pairs, 2)]
    else:
        specs = [Spec(cat, ((*a, 1), (*b, 1)), r) for a, b in itertools.permutations(pairs, 2) for r in RELATIONS]
    held = split == "heldout"
    return tuple(format_spec(sp) for sp in specs
                 if any((c, s) in HELDOUT_PAIRS for c, s, _ in sp.objects) == held)


def all_prompts(split: str, categories: tuple[str, ...] | None = None) -> list[str]:
    """Every prompt of a split (optionally of some categories), in a fixed order."""
    return [p for c in _resolve(split, categories) for p in _prompts(c, split)]


def sample_prompts(
    n: int, rng: np.random.Generator, *, split: str = "train", categories: tuple[str, ...] | None = None
) -> list[str]:
    """`n` prompts of a split: a category uniformly, then a prompt uniformly among that category's."""
    cats = _resolve(split, categories)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for ci in rng.integers(len(cats), size=n):
        pool = _prompts(cats[ci], split)
        out.append(pool[rng.integers(len(pool))])
    return out
