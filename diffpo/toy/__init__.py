"""The shapes world: an offline synthetic text-to-image testbed.

Prompts come from a tiny grammar (``grammar``), images are drawn procedurally
(``render``), a word-level tokenizer and CLIP text config let a tiny diffusers
pipeline train on it (``tokenizer``), and a programmatic checker judges whether
an image matches its prompt (``checker``, ``rewards``).
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
from diffpo.toy.tokenizer import build_tokenizer, text_encoder_config

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
    "build_tokenizer",
    "check",
    "detect",
    "faithfulness",
    "render",
    "render_batch",
    "segment",
    "split_prompts",
    "text_encoder_config",
]
