"""The shapes world's tokenizer: the core's word-level tokenizer over the grammar's vocabulary.

The grammar is closed, so one id per ``VOCAB`` word is exact and tiny (``diffpo.word_tokenizer``
says how it stays CLIP-compatible).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from diffpo.toy.grammar import VOCAB
from diffpo.word_tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, build_word_tokenizer, text_encoder_config

__all__ = ["BOS", "EOS", "PAD", "SPECIAL_TOKENS", "UNK", "build_tokenizer", "text_encoder_config"]


def build_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """One id per ``VOCAB`` word, bos/eos around the text, ``<unk>`` for other words.

    The longest grammar prompt is 12 words ("a small red sks star on the left on a black
    background"), so the default ``max_length`` of 16 fits every prompt plus bos/eos untruncated.
    """
    return build_word_tokenizer(VOCAB, max_length)
