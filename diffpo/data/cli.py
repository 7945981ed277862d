"""``diffpo pairs from-images``: a folder of target images -> a pair dataset the trainer reads;
``diffpo pairs candidates``: N samples per prompt, to label by hand with ``diffpo label``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffpo.config import ConfigError
from diffpo.options import add_command
from diffpo.sampling import SamplerSettings


@dataclass
class FromImagesOptions:
    chosen: Path
    """Folder of target images (style, subject, safe content)."""
    prompts: str
    """'captions' (sidecar .txt per image), a .jsonl (file, prompt) or a text file (one prompt per image, or one for all)."""
    base: str
    """Base model: hub id, local folder, toy:base or tiny:sd."""
    out: Path
    """Pair dataset folder (pairs.jsonl and the images)."""
    rejected_prompts: str | None = None
    """Prompts for the rejected generations (null: the --prompts ones), e.g. the class prompt for personalization."""
    per_image: int = 1
    """Rejected generations per chosen image (DreamBooth: many class images for a few subject images)."""
    seed: int = 0
    """Rejected image k uses seed SEED+k."""
    batch_size: int = 16
    """Images per sampling batch."""
    device: str = "cpu"
    """Torch device for sampling."""
    sampler: SamplerSettings = field(default_factory=SamplerSettings)

    def __post_init__(self):
        if self.per_image < 1:
            raise ConfigError(f"per_image: must be >= 1, got {self.per_image}")


def cmd_from_images(o: FromImagesOptions) -> int:
    from diffpo.config import ModelConfig
    from diffpo.data.from_images import build_pairs_from_images, list_images, read_prompts
    from diffpo.models import load_components
    from diffpo.sampling import resolve_settings

    # Every input is checked before the model loads.
    chosen = list_images(o.chosen)
    prompts = read_prompts(o.prompts, chosen)
    rejected_prompts = read_prompts(o.rejected_prompts, chosen, "--rejected-prompts") if o.rejected_prompts else None
    components = load_components(ModelConfig(pretrained=o.base))
    sampler = resolve_settings(components, o.sampler)  # a bad setting fails before any sampling
    path = build_pairs_from_images(
        components, chosen, prompts, o.out, seed=o.seed, rejected_prompts=rejected_prompts, per_image=o.per_image,
        sampler=sampler, batch_size=o.batch_size, device=o.device,
    )
    print(f"{len(chosen) * o.per_image} pairs written to {path}; train with: diffpo train --config FILE data.source={path}")
    return 0


@dataclass
class CandidatesOptions:
    base: str
    """Model: hub id, local folder, toy:base or tiny:sd."""
    prompts: str
    """A .txt/.jsonl prompt file or a built-in set (as diffpo eval --prompts)."""
    out: Path
    """Folder for images/ and candidates.jsonl."""
    per_prompt: int = 2
    """Candidates per prompt (2: a left/right pair)."""
    max_prompts: int | None = None
    """Only the first K prompts."""
    seed: int = 0
    """Candidate image k (counted over all prompts, per_prompt to a prompt) uses seed SEED+k."""
    sampler: SamplerSettings = field(default_factory=lambda: SamplerSettings(num_inference_steps=25, guidance_scale=5.0))
    batch_size: int = 16
    """Images per sampling batch."""
    device: str = "cpu"
    """Torch device for sampling."""

    def __post_init__(self):
        if self.per_prompt < 2:
            raise ConfigError(f"per_prompt: must be >= 2 (candidates are compared), got {self.per_prompt}")


def cmd_candidates(o: CandidatesOptions) -> int:
    from diffpo.config import ModelConfig
    from diffpo.data.candidates import write_candidates
    from diffpo.evaluate.prompts import load_prompts
    from diffpo.models import load_components

    prompts = load_prompts(o.prompts)[: o.max_prompts]
    components = load_components(ModelConfig(pretrained=o.base))
    for module in (components.network, *components.frozen_modules()):
        module.to(o.device)
    path = write_candidates(components, prompts, o.out, per_prompt=o.per_prompt, seed=o.seed, sampler=o.sampler.as_dict(),
                            batch_size=o.batch_size, device=o.device)
    print(f"{len(prompts)} prompts x {o.per_prompt} candidates written to {path}; label them with: diffpo label --candidates {path} --out pairs/NAME")
    return 0


def register_cli(sub) -> None:
    pairs = sub.add_parser("pairs", help="build preference pair datasets")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", required=True)
    add_command(pairs_sub, "from-images", FromImagesOptions, cmd_from_images,
                help="chosen = your images, rejected = the base model's generations of the same prompts")
    add_command(pairs_sub, "candidates", CandidatesOptions, cmd_candidates,
                help="N samples of a model per prompt, to label by hand with diffpo label --candidates")
