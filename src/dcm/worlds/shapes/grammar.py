"""The shapes world's caption grammar: the vocabulary, captions built from attributes and parsed
back.

Full captions name all five attributes: "a <colour> [<texture>] <shape> moves <direction> <speed>",
the texture word left out for "plain" (288 captions, ``all_captions``).  *Open* captions (opt-in,
``world.open_share``) leave some attributes unnamed, and the world draws each unnamed attribute
uniformly per seed (``render.sample_scene``).  Their phrasing keeps the same word order and drops the
unnamed words: no colour word, no direction or speed word, the generic noun ``shape`` for an open
shape, and no texture word for an open texture, which is why an open caption always names its texture
when it names it, "plain" included ("a red plain square moves left": speed open, plain texture;
"a red square moves left": speed and texture open).  A caption that names colour, shape, direction and
speed is full, so texture can be left open only together with another attribute.  Every caption thus
has one meaning, and every meaning one caption.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
TEXTURES = ("plain", "striped", "checked")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")

ATTRIBUTES = ("shape", "colour", "texture", "direction", "speed")
VOCABULARY = {
    "shape": SHAPES,
    "colour": COLOURS,
    "texture": TEXTURES,
    "direction": DIRECTIONS,
    "speed": SPEEDS,
}


def _check_word(attribute: str, word: str) -> None:
    """Raise ValueError naming the bad word and the allowed ones."""
    allowed = VOCABULARY[attribute]
    if word not in allowed:
        raise ValueError(f"unknown {attribute} {word!r}; allowed: {', '.join(allowed)}")


OPEN_SHAPE_WORD = "shape"  # the noun of a caption that leaves the shape open
OPEN_CAPTION_STREAM = 11  # random stream (with the seed) that decides whether and how a caption is opened


def make_caption(shape: str | None, colour: str | None, texture: str | None, direction: str | None,
                 speed: str | None) -> str:
    """Caption of the attributes; the texture word is omitted for "plain".

    ``None`` leaves an attribute open (module docstring): "a striped shape moves left" leaves colour,
    shape and speed open.  Texture alone cannot be open (that caption is the full "plain" one).
    """
    named = {"shape": shape, "colour": colour, "texture": texture, "direction": direction, "speed": speed}
    open_set = [a for a in ATTRIBUTES if named[a] is None]
    for attribute in ATTRIBUTES:
        if named[attribute] is not None:
            _check_word(attribute, named[attribute])
    if not open_set:
        texture_word = "" if texture == "plain" else f"{texture} "
        return f"a {colour} {texture_word}{shape} moves {direction} {speed}"
    if open_set == ["texture"]:
        raise ValueError("texture cannot be the only open attribute: 'a <colour> <shape> moves <direction> "
                         "<speed>' is the full caption of the plain texture")
    words = ["a", colour, texture, shape or OPEN_SHAPE_WORD, "moves", direction, speed]
    return " ".join(w for w in words if w is not None)



def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of ``Scene.caption``: the five attributes (texture "plain" when no texture word).

    Full captions only; an open caption raises naming what it leaves open (``parse_open_caption``)."""
    try:
        left_open = [a for a, v in parse_open_caption(caption).items() if v is None]
    except ValueError:
        left_open = []
    if left_open:
        raise ValueError(f"caption {caption!r} leaves {', '.join(left_open)} open: parse_caption reads full "
                         "captions only (parse_open_caption reads open ones)")
    words = caption.strip().lower().split()
    if len(words) not in (6, 7):
        raise ValueError(
            f"cannot parse caption {caption!r}: expected "
            "'a <colour> [<texture>] <shape> moves <direction> <speed>'"
        )
    if words[0] != "a":
        raise ValueError(f"caption {caption!r} must start with 'a', got {words[0]!r}")
    if words[-3] != "moves":
        raise ValueError(f"caption {caption!r}: expected 'moves', got {words[-3]!r}")
    texture = words[2] if len(words) == 7 else "plain"
    parsed = {
        "shape": words[-4],
        "colour": words[1],
        "texture": texture,
        "direction": words[-2],
        "speed": words[-1],
    }
    for attribute in ATTRIBUTES:
        _check_word(attribute, parsed[attribute])
    return parsed


def parse_open_caption(caption: str) -> dict[str, str | None]:
    """The five attributes of a full or open caption, ``None`` for those it leaves open.

    A full caption parses as ``parse_caption`` does.  Raises ValueError naming what is wrong for
    anything ``make_caption`` cannot produce (unknown words, wrong order, a redundant "plain").
    """
    words = caption.strip().lower().split()
    expected = "'a [<colour>] [<texture>] <shape or 'shape'> moves [<direction>] [<speed>]'"
    if not words or words[0] != "a" or words.count("moves") != 1:
        raise ValueError(f"cannot parse caption {caption!r}: expected {expected}")
    verb = words.index("moves")
    before, after = words[1:verb], words[verb + 1:]
    if not before:
        raise ValueError(f"caption {caption!r} has no shape noun before 'moves': expected {expected}")
    noun, modifiers = before[-1], before[:-1]
    parsed: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    if noun != OPEN_SHAPE_WORD:
        _check_word("shape", noun)
        parsed["shape"] = noun
    for slots, part in ((("colour", "texture"), modifiers), (("direction", "speed"), after)):
        position = 0
        for word in part:
            slot = next((k for k, a in enumerate(slots) if word in VOCABULARY[a]), None)
            if slot is None or slot < position:
                allowed = " then ".join(f"<{a}> ({', '.join(VOCABULARY[a])})" for a in slots)
                raise ValueError(f"caption {caption!r}: unexpected word {word!r}; allowed here: {allowed}")
            parsed[slots[slot]] = word
            position = slot + 1
    others_named = all(parsed[a] is not None for a in ATTRIBUTES if a != "texture")
    if others_named:
        if parsed["texture"] == "plain":
            raise ValueError(f"caption {caption!r}: a full caption leaves out 'plain' "
                             f"({make_caption(**{**parsed, 'texture': 'plain'})!r})")
        parsed["texture"] = parsed["texture"] or "plain"
    return parsed


def open_attributes_of(caption: str) -> tuple[str, ...]:
    """The attributes ``caption`` leaves open, in ``ATTRIBUTES`` order (empty for a full caption)."""
    return tuple(a for a, v in parse_open_caption(caption).items() if v is None)


def is_open(caption: str) -> bool:
    """Whether ``caption`` leaves any attribute open."""
    return bool(open_attributes_of(caption))


def open_sets(attributes: Sequence[str] = ATTRIBUTES) -> list[tuple[str, ...]]:
    """Every set of attributes a caption may leave open within ``attributes``: non-empty, not texture
    alone; each in ``ATTRIBUTES`` order, the list by size then order."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; allowed: {', '.join(ATTRIBUTES)}")
    chosen = [a for a in ATTRIBUTES if a in set(attributes)]
    subsets = [s for k in range(1, len(chosen) + 1) for s in itertools.combinations(chosen, k)]
    return [s for s in subsets if s != ("texture",)]


def open_captions(attributes: Sequence[str] = ATTRIBUTES) -> list[str]:
    """Every open caption whose open attributes lie within ``attributes`` (816 for all five), sorted."""
    captions = set()
    for open_set in open_sets(attributes):
        choices = [(None,) if a in open_set else VOCABULARY[a] for a in ATTRIBUTES]
        for combo in itertools.product(*choices):
            captions.add(make_caption(**dict(zip(ATTRIBUTES, combo, strict=True))))
    return sorted(captions)


def open_caption(caption: str, open_set: Sequence[str]) -> str:
    """``caption`` (full or open) with the attributes in ``open_set`` left open as well."""
    named = parse_open_caption(caption)
    return make_caption(**{a: None if a in set(open_set) else v for a, v in named.items()})


def coarsen_caption(caption: str, seed: int | Sequence[int], open_share: float,
                    attributes: Sequence[str] = ATTRIBUTES) -> str:
    """The world's caption of a scene captioned ``caption`` at ``seed``: with probability ``open_share`` it
    leaves open one of ``open_sets(attributes)``, drawn uniformly; else ``caption`` itself.

    Deterministic in ``seed`` on its own stream (``OPEN_CAPTION_STREAM``), so the scene drawn from the seed
    is unchanged; ``open_share == 0`` returns ``caption`` without drawing anything.  Since a scene's
    attributes are drawn uniformly and independently, the open attributes of a coarsened caption are
    uniform given the caption: what the open prompts ask a model to reproduce.
    """
    if open_share <= 0:
        return caption
    key = [int(seed)] if isinstance(seed, int | np.integer) else [int(k) for k in seed]
    rng = np.random.default_rng([*key, OPEN_CAPTION_STREAM])
    if rng.random() >= open_share:
        return caption
    choices = open_sets(attributes)
    return open_caption(caption, choices[int(rng.integers(len(choices)))])


def all_captions() -> list[str]:
    """Every caption of the world (288), sorted."""
    combos = itertools.product(SHAPES, COLOURS, TEXTURES, DIRECTIONS, SPEEDS)
    return sorted(make_caption(*combo) for combo in combos)

