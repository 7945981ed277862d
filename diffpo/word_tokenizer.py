"""Word-level tokenizer and tiny CLIP text-encoder config for small closed vocabularies.

With a closed vocabulary (the shapes world's grammar, the tiny test models' prompts) one id per
word is exact and tiny; the tokenizer is a ``PreTrainedTokenizerFast`` so that diffusers'
pipelines (which expect a CLIP-style tokenizer: padding to ``model_max_length``, bos/eos) and
``save_pretrained``/``AutoTokenizer.from_pretrained`` work unchanged. The tiny models
(``diffpo.tiny``) and the shapes world (``diffpo.toy.tokenizer``) both build on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
"""Ids 0..3.  EOS must not be id 2: CLIPTextModel treats eos_token_id == 2 as the
legacy config and then pools at the *largest id* instead of at the eos token."""


def build_word_tokenizer(words: Sequence[str], max_length: int = 16) -> PreTrainedTokenizerFast:
    """Lower-cased, whitespace-split, one id per word of ``words`` (ids 4, 5, ... in order after
    ``SPECIAL_TOKENS``); wraps text in bos/eos. Unknown words map to ``<unk>``; ``max_length``
    counts bos and eos.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
    )


def text_encoder_config(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2, heads: int = 4
) -> CLIPTextConfig:
    """A tiny ``CLIPTextConfig`` sized to ``tokenizer`` (vocabulary, context, special ids)."""
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by heads {heads}")
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
