"""Word-level tokenizer and tiny CLIP text config: CLIP-like batching, save/load round trip, pooling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from diffpo.toy.grammar import EXTRA_SHAPES, SHAPES, VOCAB, ShapePrompt, all_prompts
from diffpo.toy.tokenizer import build_tokenizer, text_encoder_config

PROMPTS = [p.text for p in all_prompts(SHAPES + EXTRA_SHAPES, with_size=True, with_position=True)[::37]]
PROMPTS.append(ShapePrompt("red", "star", "black", "small", "left", token="sks").text)  # the longest form


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Exactly how diffusers' StableDiffusionPipeline tokenizes prompts."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


def test_special_ids_and_vocabulary(tokenizer: PreTrainedTokenizerBase) -> None:
    specials = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert specials == (0, 1, 2, 3)
    assert len(tokenizer) == len(VOCAB) + 4
    ids = tokenizer.convert_tokens_to_ids(VOCAB)
    assert len(set(ids)) == len(VOCAB) and tokenizer.unk_token_id not in ids


def test_batches_are_clip_like(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = _ids(tokenizer, PROMPTS)
    assert ids.shape == (len(PROMPTS), 16)
    for row, text in zip(ids.tolist(), PROMPTS):
        n = len(text.split())
        assert row[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in row[1 : n + 1]
        assert row[n + 1] == tokenizer.eos_token_id
        assert set(row[n + 2 :]) <= {tokenizer.pad_token_id}
        assert tokenizer.decode(row, skip_special_tokens=True) == text


def test_unknown_words_case_and_truncation(tokenizer: PreTrainedTokenizerBase) -> None:
    row = _ids(tokenizer, ["A RED blorp circle"])[0].tolist()
    a, red, circle = tokenizer.convert_tokens_to_ids(["a", "red", "circle"])
    assert row[:6] == [2, a, red, tokenizer.unk_token_id, circle, 3]
    long = _ids(tokenizer, ["red " * 40])[0].tolist()
    assert len(long) == 16 and long[0] == 2 and long[-1] == 3  # truncation keeps bos/eos
    assert build_tokenizer(max_length=24).model_max_length == 24


def test_save_load_round_trip(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 16
    assert torch.equal(_ids(reloaded, PROMPTS + ["zzz top"]), _ids(tokenizer, PROMPTS + ["zzz top"]))


def test_text_encoder_config_and_pooling(tokenizer: PreTrainedTokenizerBase) -> None:
    config = text_encoder_config(tokenizer, hidden_size=32, layers=2, heads=2)
    assert config.vocab_size == len(tokenizer) and config.max_position_embeddings == 16
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 2, 3)
    assert config.projection_dim == 32 and config.intermediate_size == 128
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    ids = _ids(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(ids)
    assert out.last_hidden_state.shape == (len(PROMPTS), 16, 32)
    eos_positions = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)
    expected = out.last_hidden_state[torch.arange(len(PROMPTS)), eos_positions]
    assert torch.allclose(out.pooler_output, expected)  # pooled at <eos>, not at the largest id
    with pytest.raises(ValueError, match="divisible"):
        text_encoder_config(tokenizer, hidden_size=30, heads=4)
