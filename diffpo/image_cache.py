"""A disk cache of generated images, keyed by everything that determines an image.

A base model's samples do not depend on any fine-tuning, yet every experiment against that base
samples them again (the rejected images of its pairs, its half of the evaluation). With a cache,
``diffpo.sampling.generate(..., cache=ImageCache(root))`` samples only the (prompt, seed) images it
has not made before for the same weights and sampler settings, and reads the rest back.

The key of an image is the SHA-256 of: the model's weights (every tensor of the denoiser and the
text encoders, so a LoRA-adapted copy or a retrained folder never matches), the resolved sampler
settings (steps, guidance, scheduler, resolution, ...), the prompt, the seed, and the versions of
torch, diffusers and of the samplers themselves (``CACHE_VERSION``). PNG is lossless,
so a cached image is the image that was made. Each image has its own seed (``diffpo.sampling``),
so it does not depend on which batch made it beyond float rounding (at most a grey level or two,
tests/test_sampling.py).

The default root is ``$DIFFPO_CACHE_DIR/images`` or ``~/.cache/diffpo/images``; delete it at will.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

CACHE_VERSION = 1
"""Part of every key: raise it when a change to the samplers changes their images."""

DIGEST_KEY = "weights_sha256"
"""``Components.extras`` key memoising the weights' digest (hashing is the cache's one cost)."""


def default_cache_root() -> Path:
    root = os.environ.get("DIFFPO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffpo"
    return Path(root) / "images"


def weights_digest(components, network: torch.nn.Module | None = None) -> str:
    """SHA-256 over the names and bytes of every tensor of the denoiser and the text encoders."""
    network = network if network is not None else components.network
    memo = components.extras.get(DIGEST_KEY)
    if network is components.network and memo is not None:
        return memo
    sha = hashlib.sha256()
    for module in (network, *components.text_encoders):
        for name, tensor in sorted(module.state_dict().items()):
            sha.update(name.encode())
            sha.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest = sha.hexdigest()
    if network is components.network:
        components.extras[DIGEST_KEY] = digest
    return digest


def _versions() -> dict[str, str]:
    """The libraries whose numerics make the images: a new release may change them."""
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


class ImageCache:
    """Images under ``root/<weights digest>/<image key>.png``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    def paths(self, digest: str, settings: Mapping[str, Any], prompts: Sequence[str], seeds: Sequence[int]) -> list[Path]:
        """Where the image of each (prompt, seed) lives, made by the weights ``digest`` with ``settings``."""
        common = json.dumps({**settings, "cache_version": CACHE_VERSION, "versions": _versions()}, sort_keys=True, default=str)
        folder = self.root / digest[:32]
        return [folder / f"{hashlib.sha256(json.dumps([common, p, int(s)]).encode()).hexdigest()[:32]}.png" for p, s in zip(prompts, seeds, strict=True)]

    @staticmethod
    def load(path: Path) -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")

    @staticmethod
    def store(image: Image.Image, path: Path) -> None:
        """Write through a temporary file: a killed run never leaves a half-written image behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        image.save(tmp)
        tmp.replace(path)
