"""Torch dataset over ``PairRecord``s: the same crop and flip for both images of a pair."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffpo.data.pairs import PairRecord


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (what diffusers VAEs and UNets expect)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)


class PairDataset(Dataset):
    """Yields ``{"pixels_w", "pixels_l", "prompt", "rejected_prompt"}`` (the latter is the pair's
    prompt unless the record names another) for a key ``(epoch, index)``, or ``index`` (epoch 0);
    randomness depends only on (seed, epoch, index).

    Both images are resized so their shorter side is ``resolution``, then cropped at the same
    offset and flipped together, so the pair stays comparable (the papers' scripts do the same).
    Keying the randomness on (seed, epoch, index) instead of a running RNG makes a resumed run see
    exactly the crops an uninterrupted one would.
    """

    def __init__(self, records: list[PairRecord], resolution: int, *, center_crop: bool = False, random_flip: bool = True, seed: int = 0):
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)  # the trainer's sampler gives (epoch, index)
        record = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        images = [resize_shorter(record.open(which), self.resolution) for which in ("chosen", "rejected")]
        # Use the smaller of the two sizes so one crop box fits both images.
        w = min(im.size[0] for im in images)
        h = min(im.size[1] for im in images)
        size = self.resolution
        if self.center_crop:
            left, top = (w - size) // 2, (h - size) // 2
        else:
            left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        flip = self.random_flip and bool(rng.random() < 0.5)
        tensors = []
        for image in images:
            image = image.crop((left, top, left + size, top + size))
            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            tensors.append(to_tensor(image))
        rejected_prompt = record.rejected_prompt or record.prompt
        item = {"pixels_w": tensors[0], "pixels_l": tensors[1], "prompt": record.prompt, "rejected_prompt": rejected_prompt, "index": index}
        return item | example_labels(record)


def example_labels(record: PairRecord) -> dict:
    """``desirable_w`` / ``desirable_l`` of a record of two unpaired examples; {} for a pair."""
    if record.labels is None:
        return {}
    return {"desirable_w": torch.tensor(record.labels[0]), "desirable_l": torch.tensor(record.labels[1])}


def collate_pairs(items: list[dict]) -> dict:
    return {
        "pixels_w": torch.stack([it["pixels_w"] for it in items]),
        "pixels_l": torch.stack([it["pixels_l"] for it in items]),
        "prompts": [it["prompt"] for it in items],
        "rejected_prompts": [it["rejected_prompt"] for it in items],
        **{key: torch.stack([it[key] for it in items]) for key in ("desirable_w", "desirable_l") if key in items[0]},
        "indices": torch.tensor([it["index"] for it in items]),
    }
