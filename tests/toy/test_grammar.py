"""Prompt grammar: exact phrasing, parse/text round trips, splits and vocabulary coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffpo.toy.grammar import (
    BACKGROUNDS,
    COLORS,
    EXTRA_SHAPES,
    IDENTIFIER_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCAB,
    ShapePrompt,
    all_prompts,
    split_prompts,
)


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def test_palettes_are_well_separated() -> None:
    assert list(COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert list(BACKGROUNDS) == ["black", "white", "gray"]
    assert min(_distance(COLORS[a], COLORS[b]) for a, b in itertools.combinations(COLORS, 2)) > 90
    assert min(_distance(c, b) for c in COLORS.values() for b in BACKGROUNDS.values()) > 100


def test_text_phrasing() -> None:
    assert ShapePrompt("red", "circle", "black").text == "a red circle on a black background"
    assert (
        ShapePrompt("red", "circle", "black", size="small", position="left").text
        == "a small red circle on the left on a black background"
    )
    assert ShapePrompt("red", "star", "black", token="sks").text == "a red sks star on a black background"
    assert (
        ShapePrompt("blue", "square", "gray", size="large", position="top", token="zxq").text
        == "a large blue zxq square at the top on a gray background"
    )


def test_parse_inverts_text_for_every_prompt_variant() -> None:
    prompts = all_prompts(SHAPES + EXTRA_SHAPES, with_size=True, with_position=True)
    prompts += [ShapePrompt(p.color, p.shape, p.background, p.size, p.position, "sks") for p in prompts[::7]]
    for prompt in prompts:
        assert ShapePrompt.parse(prompt.text) == prompt


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",
        "a pink circle on a black background",
        "a red circle on a black background ",
        "a red red circle on a black background",  # a colour is not an identifier token
        "a red circle in the middle on a black background",
        "A red circle on a black background",
    ],
)
def test_parse_rejects_non_prompts_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a shapes-world prompt") as err:
        ShapePrompt.parse(text)
    assert repr(text) in str(err.value)


def test_invalid_fields_are_rejected() -> None:
    with pytest.raises(ValueError, match="color 'pink'"):
        ShapePrompt("pink", "circle", "black")
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        ShapePrompt("red", "hexagon", "black")
    with pytest.raises(ValueError, match="position 'middle'"):
        ShapePrompt("red", "circle", "black", position="middle")
    with pytest.raises(ValueError, match="token"):
        ShapePrompt("red", "circle", "black", token="two words")


def test_all_prompts_counts_order_and_uniqueness() -> None:
    base = all_prompts()
    assert len(base) == len(SHAPES) * len(COLORS) * len(BACKGROUNDS) == 54
    assert base[0] == ShapePrompt("red", "circle", "black")
    assert {p.shape for p in base} == set(SHAPES)
    full = all_prompts(SHAPES + EXTRA_SHAPES, with_size=True, with_position=True)
    assert len(full) == 4 * 6 * 3 * len(SIZES) * len(POSITIONS) == 720
    assert len(set(full)) == len(full)
    assert full == all_prompts(SHAPES + EXTRA_SHAPES, with_size=True, with_position=True)


def test_split_is_deterministic_disjoint_and_covers_every_word_in_train() -> None:
    prompts = all_prompts(with_size=True)
    train, heldout = split_prompts(prompts, heldout_fraction=0.2, seed=0)
    assert (train, heldout) == split_prompts(prompts, heldout_fraction=0.2, seed=0)
    assert len(heldout) == round(0.2 * len(prompts)) == 22
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(prompts)
    assert train == [p for p in prompts if p in set(train)]  # input order kept
    for attribute in ("color", "shape", "background", "size"):
        assert {getattr(p, attribute) for p in train} == {getattr(p, attribute) for p in prompts}
    assert split_prompts(prompts, seed=1)[1] != heldout


def test_split_edge_cases() -> None:
    two = all_prompts()[:2]
    train, heldout = split_prompts(two, heldout_fraction=0.01)
    assert len(train) == 1 and len(heldout) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_prompts(two[:1])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_prompts(two, heldout_fraction=1.0)


def test_vocab_covers_every_prompt_word_and_identifiers() -> None:
    words = {w for p in all_prompts(SHAPES + EXTRA_SHAPES, True, True) for w in p.text.split()}
    assert words <= set(VOCAB)
    assert set(IDENTIFIER_WORDS) <= set(VOCAB)
    assert not set(IDENTIFIER_WORDS) & words
    assert len(VOCAB) == len(set(VOCAB)) == len(words) + len(IDENTIFIER_WORDS)
