"""Reward-model scorers, exercised on tiny random CLIP models saved to disk.

No weights can be downloaded here, so each test builds a tiny model from a config, saves it
(with a tokenizer and image processor) to a temporary folder and loads it through
``load_scorer(name, model=folder)`` -- the same from_pretrained path a hub id takes. Every
score is compared with a reference computed independently from the model's raw outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from diffpo.evaluate import SCORERS, Scorer, load_scorer, register_scorer
from diffpo.evaluate import scorers as scorers_module
from diffpo.evaluate.scorers import openclip_to_transformers

IMAGE_SIZE = 32
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a red cube", "a photo of a cat on a mat", "blue"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with only byte-level tokens; specials last, so EOS has the top id."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_clip(tokenizer: CLIPTokenizer, *, projection_dim: int = 16, hidden_act: str = "quick_gelu") -> CLIPModel:
    torch.manual_seed(0)
    tower = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act=hidden_act
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # HF's init makes every embedding nearly identical; spread them out
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def save_clip(folder: Path, *, projection_dim: int = 16, hidden_act: str = "quick_gelu") -> CLIPModel:
    """Save a tiny CLIP with its tokenizer and image processor, as a hub repo would hold it."""
    tokenizer = tiny_tokenizer()
    model = tiny_clip(tokenizer, projection_dim=projection_dim, hidden_act=hidden_act)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return model


def square_images(n: int = 3) -> list[Image.Image]:
    """Images already at the model resolution, so resize and crop are the identity."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def reference_embeddings(model: CLIPModel, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """Unit image/text embeddings computed by hand: pixels normalised with numpy, one at a time."""
    tokenizer = tiny_tokenizer()
    img, txt = [], []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            pixels = (np.asarray(image, dtype=np.float64) / 255.0 - MEAN) / STD
            pixel_values = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
            img.append(model.get_image_features(pixel_values=pixel_values).pooler_output[0])
            ids = tokenizer([prompt], return_tensors="pt")
            txt.append(model.get_text_features(**ids).pooler_output[0])
    img_t, txt_t = torch.stack(img), torch.stack(txt)
    return img_t / img_t.norm(dim=-1, keepdim=True), txt_t / txt_t.norm(dim=-1, keepdim=True)


def assert_valid_scores(scorer: Scorer, images: list[Image.Image], expected: torch.Tensor) -> None:
    scores = scorer.score(images, PROMPTS)
    assert len(scores) == len(images)
    assert all(isinstance(s, float) and np.isfinite(s) for s in scores)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert scorer.score(images, PROMPTS) == scores  # deterministic
    assert len(set(scores)) == len(scores)  # the reference is not trivially constant


# ----------------------------------------------------------------------------- tests


def test_pickscore_is_scaled_cosine(tmp_path: Path) -> None:
    model = save_clip(tmp_path)
    scorer = load_scorer("pickscore", model=tmp_path, processor=tmp_path, batch_size=2)
    img, txt = reference_embeddings(model, square_images(), PROMPTS)
    expected = model.logit_scale.exp().detach() * (img * txt).sum(-1)
    assert_valid_scores(scorer, square_images(), expected)
    description = scorer.describe()
    assert description["name"] == "pickscore"
    assert description["model"] == str(tmp_path)
    assert set(description["packages"]) == {"torch", "transformers"}


def test_clip_score_is_clamped_hundred_times_cosine(tmp_path: Path) -> None:
    model = save_clip(tmp_path)
    scorer = load_scorer("clip_score", model=tmp_path)
    img, txt = reference_embeddings(model, square_images(), PROMPTS)
    expected = 100 * (img * txt).sum(-1).clamp(min=0)
    assert_valid_scores(scorer, square_images(), expected)
    assert scorer.describe()["model"] == str(tmp_path)


def test_aesthetic_runs_the_released_head_on_the_unit_image_embedding(tmp_path: Path) -> None:
    model = save_clip(tmp_path, projection_dim=768)
    torch.manual_seed(1)
    shapes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    head = {}
    for layer, (out_dim, in_dim) in shapes.items():  # key names of sac+logos+ava1-l14-linearMSE.pth
        head[f"layers.{layer}.weight"] = torch.randn(out_dim, in_dim) / in_dim**0.5
        head[f"layers.{layer}.bias"] = torch.randn(out_dim)
    torch.save(head, tmp_path / "head.pth")

    scorer = load_scorer("aesthetic", model=tmp_path, head=tmp_path / "head.pth")
    x, _ = reference_embeddings(model, square_images(), PROMPTS)
    for layer in shapes:  # no activations: the "linear" head; dropouts are off in eval
        x = x @ head[f"layers.{layer}.weight"].T + head[f"layers.{layer}.bias"]
    assert_valid_scores(scorer, square_images(), x[:, 0])
    assert scorer.score(square_images(), ["anything"] * 3) == scorer.score(square_images(), PROMPTS)
    assert scorer.describe()["head"] == str(tmp_path / "head.pth")


def transformers_to_openclip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """Write a transformers CLIP's weights in OpenCLIP's layout, as HPS checkpoints store them."""
    sd = model.state_dict()
    out = {
        "logit_scale": sd["logit_scale"],
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "visual.proj": sd["visual_projection.weight"].T,
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
    }
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        for i in range(2):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for theirs, ours in (
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ):
                    out[dst + f"{theirs}.{kind}"] = sd[src + f"{ours}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("name", ["hpsv2", "hpsv21"])
def test_hps_loads_an_openclip_checkpoint_and_scores_cosine(tmp_path: Path, name: str) -> None:
    model = save_clip(tmp_path, hidden_act="gelu")  # ViT-H-14 in OpenCLIP uses exact GELU
    torch.save({"state_dict": transformers_to_openclip(model)}, tmp_path / "hps.pt")
    scorer = load_scorer(name, model=tmp_path / "hps.pt", backbone=tmp_path, batch_size=2)
    img, txt = reference_embeddings(model, square_images(), PROMPTS)
    assert_valid_scores(scorer, square_images(), (img * txt).sum(-1))
    assert scorer.name == name
    assert scorer.describe()["model"] == str(tmp_path / "hps.pt")


def test_hps_preprocessing_resizes_the_short_side_and_center_crops() -> None:
    # A 32x64 image whose left and right quarters are black: the centre crop keeps the white
    # middle only, and downscaling a 2x-upscaled image keeps it exactly white.
    array = np.zeros((64, 128, 3), dtype=np.uint8)
    array[:, 32:96] = 255
    pixels = scorers_module._hps_preprocess(Image.fromarray(array), IMAGE_SIZE)
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    white = torch.tensor((1.0 - MEAN) / STD, dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(pixels[:, :, 4:-4], white.expand(3, IMAGE_SIZE, IMAGE_SIZE - 8), atol=1e-5, rtol=0)


def test_openclip_conversion_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown keys.*module\.logit_scale"):
        openclip_to_transformers({"module.logit_scale": torch.zeros(())})


def test_hps_rejects_a_checkpoint_that_does_not_fill_the_model(tmp_path: Path) -> None:
    model = save_clip(tmp_path, hidden_act="gelu")
    state = transformers_to_openclip(model)
    del state["visual.proj"]
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    with pytest.raises(ValueError, match=r"visual_projection\.weight"):
        load_scorer("hpsv2", model=tmp_path / "hps.pt", backbone=tmp_path)


def test_mismatched_images_and_prompts_are_rejected(tmp_path: Path) -> None:
    save_clip(tmp_path)
    scorer = load_scorer("clip_score", model=tmp_path)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.score(square_images(), PROMPTS[:2])


def test_unknown_scorer_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown scorer 'pick_score'; valid names: ") as excinfo:
        load_scorer("pick_score")
    for name in ("aesthetic", "clip_score", "hpsv2", "hpsv21", "imagereward", "pickscore"):
        assert name in str(excinfo.value)


def test_register_scorer_adds_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorers_module, "SCORERS", dict(SCORERS))

    class Brightness:
        name = "brightness"

        def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
            return [float(np.asarray(image).mean()) for image in images]

        def describe(self) -> dict[str, object]:
            return {"name": self.name, "model": None, "packages": {}}

    calls: list[dict[str, object]] = []

    def factory(**kw: object) -> Brightness:
        calls.append(kw)
        return Brightness()

    register_scorer("brightness", factory)
    scorer = load_scorer("brightness", device="cpu", scale=2)
    assert isinstance(scorer, Scorer)
    assert calls == [{"model": None, "device": torch.device("cpu"), "dtype": torch.float32, "scale": 2}]
    assert scorer.score([Image.new("RGB", (4, 4), (10, 20, 30))], ["x"]) == [20.0]
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("brightness", factory)


def test_imagereward_explains_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # makes `import ImageReward` fail
    with pytest.raises(RuntimeError, match="pip install image-reward"):
        load_scorer("imagereward")


def test_importing_diffpo_evaluate_loads_no_model_library() -> None:
    code = (
        "import sys, diffpo.evaluate\n"
        "loaded = [m for m in ('transformers', 'open_clip', 'ImageReward', 'huggingface_hub') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---------------------------------------------- parity with the real OpenCLIP, where importable


def open_clip_or_skip():  # type: ignore[no-untyped-def]
    try:
        import open_clip
        import torchvision.transforms as T
    except Exception as exc:  # absent, or torchvision built for another torch (CPU-only torch)
        pytest.skip(f"open_clip/torchvision not importable: {exc!r}")
    return open_clip, T


def openclip_hf_tokenizer(open_clip) -> CLIPTokenizer:  # type: ignore[no-untyped-def]
    """OpenCLIP's own BPE vocabulary (open_clip/tokenizer.py SimpleTokenizer) as a transformers tokenizer."""
    import gzip

    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as bpe:
        lines = bpe.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # transformers' annotation says list[str], but the tokenizers backend wants (left, right) pairs
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)  # type: ignore[arg-type]


def test_hps_matches_open_clip_with_hps_preprocessing(tmp_path: Path) -> None:
    open_clip, T = open_clip_or_skip()
    torch.manual_seed(0)
    width, layers, heads = 32, 2, 2
    oc_model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=layers, width=width, head_width=width // heads, patch_size=8, image_size=IMAGE_SIZE),
        text_cfg=dict(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers),
    ).eval()
    with torch.no_grad():
        for param in oc_model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    torch.save({"state_dict": oc_model.state_dict()}, tmp_path / "hps.pt")

    tokenizer = openclip_hf_tokenizer(open_clip)
    tokenizer.save_pretrained(tmp_path)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", eos_token_id=49407),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu"),
        projection_dim=16,
    ).save_pretrained(tmp_path)
    scorer = load_scorer("hpsv2", model=tmp_path / "hps.pt", backbone=tmp_path)

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 90), (77, 41), (32, 32)]
    ]
    # hpsv2/src/open_clip/transform.py image_transform(is_train=False), built from torchvision.
    preprocess = T.Compose(
        [
            T.ToTensor(),
            T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(IMAGE_SIZE),
            T.Normalize(MEAN.tolist(), STD.tolist()),
        ]
    )
    with torch.no_grad():
        image_features = oc_model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text_features = oc_model.encode_text(open_clip.tokenize(PROMPTS), normalize=True)
    expected = (image_features * text_features).sum(-1)
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected.numpy(), rtol=1e-4, atol=1e-5)
