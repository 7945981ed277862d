"""Prompt grammar of the shapes world.

Every prompt names a foreground colour, a shape and a background, optionally a
size, a position and a personalization identifier word.  The grammar is tiny
and closed so that a word-level tokenizer covers it exactly and a programmatic
checker can judge any image against any prompt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

RGB = tuple[int, int, int]

# Foreground colours are far apart in RGB (minimum pairwise distance ~92) and far
# from every background (minimum ~108), so nearest-prototype classification keeps
# working under render jitter, noise and the colour drift of a small model.
COLORS: dict[str, RGB] = {
    "red": (210, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (230, 215, 30),
    "purple": (140, 40, 190),
    "orange": (245, 125, 15),
}

# White is slightly off-white and yellow is slightly dark so that yellow on white
# still differs by >200 in the blue channel.
BACKGROUNDS: dict[str, RGB] = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shapes of the base training distribution."""

EXTRA_SHAPES: tuple[str, ...] = ("star",)
"""Shapes that are rendered and recognised but never in base training data."""

SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

IDENTIFIER_WORDS: tuple[str, ...] = ("sks", "zxq", "vlt")
"""Spare words that are in the vocabulary but in no base prompt, for personalization."""

_FUNCTION_WORDS: tuple[str, ...] = ("a", "on", "the", "at", "in", "background")


def _build_vocab() -> list[str]:
    """Every word any prompt can contain, in a fixed order, plus identifier words."""
    words: list[str] = list(_FUNCTION_WORDS)
    for group in (COLORS, BACKGROUNDS, SHAPES + EXTRA_SHAPES, SIZES, POSITIONS, IDENTIFIER_WORDS):
        words.extend(w for w in group if w not in words)
    return words


VOCAB: list[str] = _build_vocab()

_RESERVED_WORDS = frozenset(VOCAB) - frozenset(IDENTIFIER_WORDS)
_TOKEN_RE = re.compile(r"[a-z0-9]+")


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_PROMPT_RE = re.compile(
    rf"a (?:(?P<size>{_alternation(SIZES)}) )?"
    rf"(?P<color>{_alternation(list(COLORS))}) "
    rf"(?:(?P<token>[a-z0-9]+) )?"
    rf"(?P<shape>{_alternation(SHAPES + EXTRA_SHAPES)})"
    rf"(?: (?P<position>{_alternation(list(POSITION_PHRASES.values()))}))?"
    rf" on a (?P<background>{_alternation(list(BACKGROUNDS))}) background"
)
_POSITION_BY_PHRASE = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}


@dataclass(frozen=True)
class ShapePrompt:
    """One prompt of the grammar; ``text`` and ``parse`` are exact inverses."""

    color: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        _require(self.color, COLORS, "color")
        _require(self.shape, SHAPES + EXTRA_SHAPES, "shape")
        _require(self.background, BACKGROUNDS, "background")
        if self.size is not None:
            _require(self.size, SIZES, "size")
        if self.position is not None:
            _require(self.position, POSITIONS, "position")
        if self.token is not None and (
            not _TOKEN_RE.fullmatch(self.token) or self.token in _RESERVED_WORDS
        ):
            raise ValueError(
                f"token {self.token!r} must be one lowercase alphanumeric word "
                f"that is not already a grammar word (e.g. one of {IDENTIFIER_WORDS})"
            )

    @property
    def text(self) -> str:
        """E.g. ``"a small red sks star on the left on a black background"``."""
        words = ["a"]
        if self.size is not None:
            words.append(self.size)
        words.append(self.color)
        if self.token is not None:
            words.append(self.token)
        words.append(self.shape)
        if self.position is not None:
            words.append(POSITION_PHRASES[self.position])
        words.append(f"on a {self.background} background")
        return " ".join(words)

    @classmethod
    def parse(cls, text: str) -> ShapePrompt:
        """Invert :attr:`text`; raise ``ValueError`` naming ``text`` if it is not a prompt."""
        match = _PROMPT_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a shapes-world prompt: {text!r}")
        groups = match.groupdict()
        position = groups["position"]
        try:
            return cls(
                color=groups["color"],
                shape=groups["shape"],
                background=groups["background"],
                size=groups["size"],
                position=None if position is None else _POSITION_BY_PHRASE[position],
                token=groups["token"],
            )
        except ValueError as err:
            raise ValueError(f"not a shapes-world prompt: {text!r} ({err})") from err


def _require(value: str, valid: Sequence[str] | dict[str, RGB], field: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {list(valid)}")


def all_prompts(
    shapes: Sequence[str] = SHAPES, with_size: bool = False, with_position: bool = False
) -> list[ShapePrompt]:
    """Every prompt over ``shapes`` (no identifier token), in a fixed nested order."""
    sizes: Sequence[str | None] = SIZES if with_size else (None,)
    positions: Sequence[str | None] = POSITIONS if with_position else (None,)
    return [
        ShapePrompt(color=color, shape=shape, background=background, size=size, position=position)
        for shape in shapes
        for color in COLORS
        for background in BACKGROUNDS
        for size in sizes
        for position in positions
    ]


def _attribute_values(prompt: ShapePrompt) -> set[tuple[str, str | None]]:
    return {
        ("color", prompt.color),
        ("shape", prompt.shape),
        ("background", prompt.background),
        ("size", prompt.size),
        ("position", prompt.position),
    }


def split_prompts(
    prompts: Sequence[ShapePrompt], heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[ShapePrompt], list[ShapePrompt]]:
    """Split into (train, heldout), keeping input order within each part.

    Held-out prompts are chosen in a seeded random order, skipping any whose
    removal would leave some attribute value (a colour, shape, ...) absent from
    train: held-out prompts are then novel *compositions* of words the model
    has seen, which is what a compositional-generalisation split should test.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts to split, got {len(prompts)}")
    n_heldout = min(len(prompts) - 1, max(1, round(heldout_fraction * len(prompts))))
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)

    counts: dict[tuple[str, str | None], int] = {}
    for prompt in prompts:
        for value in _attribute_values(prompt):
            counts[value] = counts.get(value, 0) + 1
    heldout: set[int] = set()
    for index in order:
        if len(heldout) == n_heldout:
            break
        values = _attribute_values(prompts[index])
        if all(counts[v] > 1 for v in values):
            heldout.add(index)
            for v in values:
                counts[v] -= 1
    if not heldout:  # every prompt is the sole carrier of some value: fall back to random
        heldout.add(order[0])
    train = [p for i, p in enumerate(prompts) if i not in heldout]
    return train, [p for i, p in enumerate(prompts) if i in heldout]
