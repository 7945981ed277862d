"""Reward models that score generated images against their prompts.

Every scorer answers the same question -- how good is this image for this prompt? -- with
one float per image, higher is better, so the evaluation code can compare a tuned model with
its base on identical (prompt, seed) pairs whichever reward model produced the numbers.
``describe()`` records which weights and package versions produced a number, because reward
scores are only comparable when they come from the same model and preprocessing.

The CLIP-based scorers (PickScore, HPS v2/v2.1, CLIP score, LAION aesthetic) all run on
``transformers.CLIPModel``. HPS ships OpenCLIP checkpoints; they are renamed into
transformers' layout on load (the architectures are identical) instead of going through the
``open_clip`` package, whose torchvision dependency cannot be installed next to the CPU
build of torch this project uses. Heavy imports happen inside the factories, so importing
this module costs no model-library import.

Plugins add scorers to the same registry with ``register_scorer`` (the shapes world's
programmatic ``shapes_*`` judges, ``diffpo.toy.scorers``); ``load_scorer`` and ``scorer_names``
load the plugins (``diffpo.plugins``) before they give up on a name.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from diffpo.plugins import load_plugins

if TYPE_CHECKING:
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel


@runtime_checkable
class Scorer(Protocol):
    """A reward model: one float per (image, prompt) pair, higher is better."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Score ``images[i]`` against ``prompts[i]`` for every i."""
        ...

    def describe(self) -> dict[str, Any]:
        """Name, weights (hub id or local path) and package versions behind the scores."""
        ...


ScorerFactory = Callable[..., Scorer]
"""Builds a scorer: ``factory(model=..., device=..., dtype=..., **kw) -> Scorer``."""

SCORERS: dict[str, ScorerFactory] = {}


def register_scorer(name: str, factory: ScorerFactory, *, overwrite: bool = False) -> None:
    """Make ``load_scorer(name, ...)`` build scorers with ``factory``.

    The factory is called as ``factory(model=model, device=device, dtype=dtype, **kw)``
    where ``model`` is None (use the default weights) or a hub id / local path. Registering
    an existing name raises unless ``overwrite`` is set, so two plugins cannot silently
    shadow each other.
    """
    if name in SCORERS and not overwrite:
        raise ValueError(f"scorer {name!r} is already registered; pass overwrite=True to replace it")
    SCORERS[name] = factory


def scorer_names() -> list[str]:
    """Every registered scorer, sorted, after loading the plugins that register more."""
    load_plugins()
    return sorted(SCORERS)


def load_scorer(
    name: str,
    *,
    model: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kw: Any,
) -> Scorer:
    """Build the scorer registered as ``name``.

    ``model`` overrides the default hub id (a local folder or file works the same way, which
    is how tests and offline machines use it); other keyword arguments go to the scorer's
    factory (e.g. ``batch_size``, ``processor``, ``backbone``, ``head``).
    """
    if name not in SCORERS:
        load_plugins()  # the name may be a plugin's (e.g. the shapes world's shapes_color)
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid names: {', '.join(sorted(SCORERS))}")
    return SCORERS[name](model=model, device=torch.device(device), dtype=dtype, **kw)


# --------------------------------------------------------------------------- helpers


def _check_pairs(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    """Reject mismatched inputs: a zip would silently drop the unpaired tail."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one prompt per image")


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(n)``."""
    return (slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size))


def _versions(*packages: str) -> dict[str, str]:
    """Installed versions, recorded with every score because preprocessing changes with them."""
    return {pkg: importlib.metadata.version(pkg) for pkg in packages}


def _pooled(features: torch.Tensor | Any) -> torch.Tensor:
    """Projected embedding from ``get_{image,text}_features``.

    transformers 5 returns a model output whose ``pooler_output`` holds the projection;
    older versions returned the tensor itself.
    """
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension in float32, so cosines do not lose half precision."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def _path_or_hub_file(path: str | Path | None, repo_id: str, filename: str) -> str:
    """A local file as given, or the default file downloaded (and cached) from the hub."""
    if path is not None:
        return str(path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename)


# --------------------------------------------------------------------- CLIP scorers


class _ClipScorer:
    """Shared machinery of the CLIP-based scorers: batching, embedding, bookkeeping.

    Subclasses define ``_reward`` from the unit-norm image and text embeddings of a batch
    (and may override ``_pixels`` when the reward model used other preprocessing).
    """

    name: str
    uses_text = True

    def __init__(
        self,
        clip: CLIPModel,
        *,
        image_processor: Any = None,
        tokenizer: Any = None,
        sources: Mapping[str, str],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.clip = clip.eval().to(device=device, dtype=dtype)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.sources = dict(sources)
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One reward per (image, prompt) pair, computed in batches without gradients."""
        _check_pairs(images, prompts)
        out: list[float] = []
        with torch.no_grad():
            for batch in _batches(len(images), self.batch_size):
                imgs = self._image_embeds(images[batch])
                txts = self._text_embeds(prompts[batch]) if self.uses_text else None
                out.extend(self._reward(imgs, txts).float().cpu().tolist())
        return out

    def describe(self) -> dict[str, Any]:
        """Scorer name, the weights it loaded, and the versions of the packages it ran on."""
        return {
            "name": self.name,
            **self.sources,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "packages": _versions("torch", "transformers"),
        }

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self._pixels(images).to(device=self.device, dtype=self.dtype)
        return _unit(_pooled(self.clip.get_image_features(pixel_values=pixels)))

    def _text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.clip.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        return _unit(_pooled(self.clip.get_text_features(**tokens)))

    def _reward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
    assert text_embeds is not None  # every text-conditioned scorer sets uses_text = True
    return (image_embeds * text_embeds).sum(dim=-1)


class PickScoreScorer(_ClipScorer):
    """PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic preferences."""

    name = "pickscore"

    def _reward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
        # github.com/yuvalkirstain/PickScore README, "Inference with PickScore":
        # scores = model.logit_scale.exp() * (text_embs @ image_embs.T)
        return self.clip.logit_scale.float().exp() * _cosine(image_embeds, text_embeds)


class ClipScoreScorer(_ClipScorer):
    """CLIP score: prompt-image agreement of a plain CLIP model, in [0, 100]."""

    name = "clip_score"

    def _reward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
        # torchmetrics functional/multimodal/clip_score.py: CLIPScore = max(100 * cos(E_I, E_C), 0).
        # torchmetrics clamps the batch mean; here each image is clamped, as its docstring states.
        return 100.0 * _cosine(image_embeds, text_embeds).clamp(min=0.0)


class HPSv2Scorer(_ClipScorer):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): OpenCLIP ViT-H-14 fine-tuned on HPD.

    The score is the raw cosine similarity, as ``hpsv2.score`` returns it (typically 0.2-0.3 for
    real images); papers often print it multiplied by 100.
    """

    name = "hpsv2"

    def __init__(self, clip: CLIPModel, *, name: str = "hpsv2", **kw: Any) -> None:
        super().__init__(clip, **kw)
        self.name = name  # "hpsv2" or "hpsv21": same model, different checkpoint

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        return torch.stack([_hps_preprocess(image, size) for image in images])

    def _reward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
        # github.com/tgxs002/HPSv2 hpsv2/img_score.py: image_features @ text_features.T (diagonal),
        # both unit-normalised by OpenCLIP's CLIP.forward.
        return _cosine(image_embeds, text_embeds)


class _AestheticHead(nn.Module):
    """The MLP of LAION's improved aesthetic predictor v2 (the "linearMSE" head).

    Layer indices match the released state dict keys (layers.0, .2, .4, .6, .7): see
    christophschuhmann/improved-aesthetic-predictor simple_inference.py, where the ReLUs are
    commented out for this head.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScorer(_ClipScorer):
    """LAION aesthetic predictor v2: an MLP on the unit-norm CLIP ViT-L/14 image embedding.

    It ignores the prompt: it rates how good the image looks, on a roughly 1-10 scale.
    """

    name = "aesthetic"
    uses_text = False

    def __init__(self, clip: CLIPModel, head: _AestheticHead, **kw: Any) -> None:
        super().__init__(clip, **kw)
        self.head = head.eval().to(device=self.device, dtype=self.dtype)

    def _reward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor:
        # improved-aesthetic-predictor simple_inference.py: model(normalized(encode_image(image))).
        return self.head(image_embeds.to(self.dtype)).squeeze(-1)


# ------------------------------------------------------------ HPS preprocessing/weights

# OPENAI_DATASET_MEAN / _STD from open_clip/constants.py; HPSv2 passes image_mean=None.
_OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
_OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def _hps_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform, re-implemented in torch.

    hpsv2/src/open_clip/transform.py ``image_transform(is_train=False)`` runs ToTensor, then
    torchvision Resize(size, BICUBIC) on the float tensor (shorter side to ``size``), then
    CenterCrop(size) and Normalize. Resize on tensors is ``interpolate(bicubic,
    antialias=True)`` (torchvision >= 0.17 default; HPSv2 does not pin torchvision). Images
    are converted to RGB: the original keeps an alpha channel, which its model cannot take.
    """
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    height, width = x.shape[1:]
    short, long = sorted((height, width))
    # torchvision _compute_resized_output_size: long side = int(size * long / short).
    new_long = int(size * long / short)
    new_hw = (size, new_long) if height <= width else (new_long, size)
    if new_hw != (height, width):
        x = nn.functional.interpolate(x[None], size=new_hw, mode="bicubic", align_corners=False, antialias=True)[0]
    top = round((new_hw[0] - size) / 2.0)
    left = round((new_hw[1] - size) / 2.0)
    x = x[:, top : top + size, left : left + size]
    return (x - _OPENAI_MEAN) / _OPENAI_STD


# OpenCLIP (OpenAI layout) -> transformers CLIPModel names, following
# src/transformers/models/clip/convert_clip_original_pytorch_to_hf.py (transformers 4.x repo).
# Values: (new name, transpose?).
_OPENCLIP_RENAMES: dict[str, tuple[str, bool]] = {
    "logit_scale": ("logit_scale", False),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    # OpenCLIP multiplies x @ proj; nn.Linear computes x @ weight.T.
    "text_projection": ("text_projection.weight", True),
    "visual.proj": ("visual_projection.weight", True),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
}
# e.g. "visual.transformer.resblocks.3.mlp.c_fc.weight", "transformer.resblocks.0.attn.in_proj_bias"
_OPENCLIP_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
_OPENCLIP_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _convert_block_entry(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Rename one transformer-block tensor; the fused qkv projection becomes q, k and v."""
    match = _OPENCLIP_BLOCK.match(key)
    if match is None:
        return None
    visual, layer, part, kind = match.groups()
    prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}"
    if part == "attn.in_proj":
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}.self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)}
    if part in _OPENCLIP_BLOCK_PARTS:
        return {f"{prefix}.{_OPENCLIP_BLOCK_PARTS[part]}.{kind}": value}
    return None


def openclip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP ViT ``CLIP`` state dict into ``transformers.CLIPModel`` keys.

    Raises ValueError listing keys it does not know, rather than dropping weights silently.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _OPENCLIP_RENAMES:
            new_key, transpose = _OPENCLIP_RENAMES[key]
            converted[new_key] = value.t().contiguous() if transpose else value
        elif (entries := _convert_block_entry(key, value)) is not None:
            converted.update(entries)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an OpenCLIP ViT CLIP state dict; unknown keys: {unknown[:10]}")
    return converted


# ------------------------------------------------------------------------ factories

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_BACKBONE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # HPSv2 fine-tunes this OpenCLIP model
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
# Hugging Face copy of sac+logos+ava1-l14-linearMSE.pth used by TRL's DDPO example
# (the original file lives in the improved-aesthetic-predictor GitHub repo, not on the hub).
AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
IMAGEREWARD_MODEL = "ImageReward-v1.0"
DEFAULT_BATCH_SIZE = 16


def _load_clip(model_id: str) -> CLIPModel:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(model_id)


def _clip_from_state_dict(config: CLIPConfig, state_dict: dict[str, torch.Tensor]) -> CLIPModel:
    """A CLIPModel holding exactly ``state_dict``.

    ``from_pretrained`` skips the random initialisation a ViT-H would spend seconds on, but
    only warns about missing weights; a reward model with random layers must fail instead.
    """
    from transformers import CLIPModel

    # With output_loading_info the return value is (model, info), which the stubs don't say.
    loaded: Any = CLIPModel.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True)
    clip, info = loaded
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise ValueError(f"checkpoint does not match the CLIP config: {problems}")
    return clip


def _load_image_processor(processor_id: str) -> Any:
    # The PIL backend reproduces the PIL resizing the original CLIP/PickScore code used;
    # the torchvision backend (transformers' default when installed) shifts scores slightly.
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(processor_id, backend="pil")


def _load_tokenizer(tokenizer_id: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_id)


def _pickscore(
    *,
    model: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    processor: str | Path = PICKSCORE_PROCESSOR,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PickScoreScorer:
    """PickScore_v1 weights with the LAION CLIP-H processor, as the PickScore README loads them."""
    model_id = str(model or PICKSCORE_MODEL)
    return PickScoreScorer(
        _load_clip(model_id),
        image_processor=_load_image_processor(str(processor)),
        tokenizer=_load_tokenizer(str(processor)),
        sources={"model": model_id, "processor": str(processor)},
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )


def _clip_score(
    *,
    model: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ClipScoreScorer:
    """A plain CLIP model and its own processor (torchmetrics' default is ViT-L/14)."""
    model_id = str(model or CLIP_SCORE_MODEL)
    return ClipScoreScorer(
        _load_clip(model_id),
        image_processor=_load_image_processor(model_id),
        tokenizer=_load_tokenizer(model_id),
        sources={"model": model_id},
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )


def _aesthetic(
    *,
    model: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    head: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> AestheticScorer:
    """CLIP ViT-L/14 (``model``) plus the aesthetic MLP (``head``: a local .pth, or the default)."""
    model_id = str(model or AESTHETIC_CLIP)
    clip = _load_clip(model_id)
    head_path = _path_or_hub_file(head, AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE)
    mlp = _AestheticHead(clip.visual_projection.out_features)
    mlp.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    return AestheticScorer(
        clip,
        mlp,
        image_processor=_load_image_processor(model_id),
        sources={"model": model_id, "head": head_path},
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )


def _hps_factory(checkpoint_file: str, name: str) -> ScorerFactory:
    """Factory for one HPS version; the versions differ only in their checkpoint file."""

    def build(
        *,
        model: str | Path | None,
        device: torch.device,
        dtype: torch.dtype,
        backbone: str | Path = HPS_BACKBONE,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> HPSv2Scorer:
        """``model``: a local HPS checkpoint (.pt with an OpenCLIP ``state_dict``) or None for
        the hub file; ``backbone``: hub id / folder with the matching CLIPConfig and tokenizer."""
        from transformers import CLIPConfig

        checkpoint = _path_or_hub_file(model, HPS_REPO, checkpoint_file)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        clip = _clip_from_state_dict(CLIPConfig.from_pretrained(str(backbone)), openclip_to_transformers(state))
        return HPSv2Scorer(
            clip,
            name=name,
            tokenizer=_load_tokenizer(str(backbone)),
            sources={"model": checkpoint, "backbone": str(backbone)},
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )

    return build


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023) through its own package, which diffpo does not depend on."""

    name = "imagereward"

    def __init__(self, reward_model: Any, model_id: str, device: torch.device) -> None:
        self.reward_model = reward_model
        self.model_id = model_id
        self.device = device

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One ImageReward score per pair; ``ImageReward.score`` takes one prompt at a time."""
        _check_pairs(images, prompts)
        with torch.no_grad():
            return [float(self.reward_model.score(p, img)) for img, p in zip(images, prompts, strict=True)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_id,
            "device": str(self.device),
            "dtype": "float32",
            "packages": _versions("torch", "transformers", "image-reward"),
        }


def _imagereward(
    *,
    model: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
) -> ImageRewardScorer:
    """Load ImageReward-v1.0 (or ``model``: a name or checkpoint path ``ImageReward.load`` takes)."""
    if dtype != torch.float32:
        raise ValueError(f"imagereward runs in float32 only (its score() builds float32 inputs), got {dtype}")
    try:
        import ImageReward
    except Exception as exc:  # missing, or broken by a transformers version it predates
        raise RuntimeError(
            "the imagereward scorer needs the optional 'image-reward' package (import name "
            f"ImageReward), which could not be imported: {exc!r}. Install it with "
            "`pip install image-reward` in an environment with a transformers version it "
            "supports (it was written for transformers 4.x); diffpo does not install it."
        ) from exc
    model_id = str(model or IMAGEREWARD_MODEL)
    return ImageRewardScorer(ImageReward.load(model_id, device=str(device)), model_id, device)


register_scorer("pickscore", _pickscore)
register_scorer("hpsv2", _hps_factory("HPS_v2_compressed.pt", "hpsv2"))
register_scorer("hpsv21", _hps_factory("HPS_v2.1_compressed.pt", "hpsv21"))
register_scorer("aesthetic", _aesthetic)
register_scorer("clip_score", _clip_score)
register_scorer("imagereward", _imagereward)

