"""The shapes world: an offline synthetic text-to-image testbed.

Prompts come from a tiny grammar (``grammar``), images are drawn procedurally
(``render``), a word-level tokenizer and CLIP text config let a tiny diffusers
pipeline train on it (``tokenizer``), and a programmatic checker judges whether
an image matches its prompt (``checker``, ``rewards``). The tokenizer lives in
``diffpo.toy.tokenizer`` and is not re-exported here, so that importing the
world (e.g. for its scorers) does not import transformers.
"""

from diffpo.toy.checker import Detection, Segmentation, check, detect, faithfulness, segment
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
from diffpo.toy.render import STYLES, render, render_batch
from diffpo.toy.rewards import REWARDS

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "EXTRA_SHAPES",
    "IDENTIFIER_WORDS",
    "POSITIONS",
    "REWARDS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "VOCAB",
    "Detection",
    "Segmentation",
    "ShapePrompt",
    "all_prompts",
    "check",
    "detect",
    "faithfulness",
    "render",
    "render_batch",
    "segment",
    "split_prompts",
]
