"""The shapes world's caption grammar: the vocabulary, captions built from attributes and parsed
back."""

from __future__ import annotations

import itertools

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


def make_caption(shape: str, colour: str, texture: str, direction: str, speed: str) -> str:
    """Caption of the attributes; the texture word is omitted for "plain"."""
    texture_word = "" if texture == "plain" else f"{texture} "
    return f"a {colour} {texture_word}{shape} moves {direction} {speed}"



def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of ``Scene.caption``: the five attributes (texture "plain" when no texture word)."""
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


def all_captions() -> list[str]:
    """Every caption of the world (288), sorted."""
    combos = itertools.product(SHAPES, COLOURS, TEXTURES, DIRECTIONS, SPEEDS)
    return sorted(make_caption(*combo) for combo in combos)

