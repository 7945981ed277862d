"""The latent / text-embedding cache: same first-step loss as training from images, no VAE or text
encoder at training time, resumable builds, refusal of a cache made differently, and the CLI."""

import json
from pathlib import Path

import pytest
import yaml
import torch

from diffpo.data import cache as cache_module
from diffpo.data.cache import CacheError, build_cache
from diffpo.cli import main
from diffpo.config import config_from_dict
from diffpo.train import train

REPO = Path(__file__).resolve().parents[1]


def make_cfg(out, data, *, sampling="mode", flip=False, cache=None, **data_extra):
    return config_from_dict({
        "output_dir": str(out),
        "seed": 5,
        "model": {"pretrained": "tiny:sd", "latent_sampling": sampling, "lora": {"enabled": True, "rank": 4}},
        "data": {"source": str(data), "resolution": 32, "center_crop": True, "random_flip": flip, "cache": cache and str(cache)} | data_extra,
        "loss": {"name": "mapo"},
        "train": {"batch_size": 2, "max_steps": 1, "learning_rate": 1e-3},
        "logging": {"report_to": "none", "progress": False},
    })


def first_loss(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory, pair_dir, model_cache):
    out = tmp_path_factory.mktemp("cache") / "flip"
    build_cache(make_cfg(out, pair_dir), out, shard_size=3, flip_copies=True, batch_size=2, progress=False, cache_dir=model_cache)
    return out


def forbid_encoders(monkeypatch):
    """Loading or running the VAE / text encoder fails the test."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from diffpo.models import StableDiffusionFamily

    def boom(*args, **kwargs):
        raise AssertionError("VAE / text encoder used while training from a cache")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", boom)
    monkeypatch.setattr(CLIPTextModel, "from_pretrained", boom)
    monkeypatch.setattr(StableDiffusionFamily, "encode_prompts", boom)
    monkeypatch.setattr(StableDiffusionFamily, "encode_image_moments", boom)


def test_cached_training_matches_images_and_skips_encoders(tmp_path, pair_dir, model_cache, flip_cache, monkeypatch):
    meta = json.loads((flip_cache / "meta.json").read_text())
    assert meta["complete"] and meta["num_pairs"] == 4 and [s["file"] for s in meta["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert meta["model.pretrained"] == "tiny:sd" and meta["model.family"] == "sd" and meta["data.resolution"] == 32
    from safetensors import safe_open

    with safe_open(str(flip_cache / "shard-00000.safetensors"), "pt") as f:
        assert {"latents_w", "latents_l", "latents_w_flip", "latents_l_flip", "cond.encoder_hidden_states"} == set(f.keys())
        assert f.get_slice("latents_w").get_shape() == [3, 4, 16, 16]

    train(make_cfg(tmp_path / "images", pair_dir), cache_dir=model_cache)
    forbid_encoders(monkeypatch)
    train(make_cfg(tmp_path / "cached", pair_dir, cache=flip_cache), cache_dir=model_cache)
    torch.testing.assert_close(first_loss(tmp_path / "cached"), first_loss(tmp_path / "images"), rtol=1e-5, atol=1e-7)


def test_cached_flips_and_posterior_sampling_match_images(tmp_path, pair_dir, model_cache):
    """random_flip picks the flipped copy as PairDataset flips; latent_sampling=sample keeps the std
    and draws mode + std * randn from the step generator, as the VAE posterior does."""
    out = tmp_path / "cache"
    build_cache(make_cfg(out, pair_dir, sampling="sample"), out, shard_size=4, flip_copies=True, progress=False, cache_dir=model_cache)
    train(make_cfg(tmp_path / "images", pair_dir, sampling="sample", flip=True), cache_dir=model_cache)
    train(make_cfg(tmp_path / "cached", pair_dir, sampling="sample", flip=True, cache=out), cache_dir=model_cache)
    torch.testing.assert_close(first_loss(tmp_path / "cached"), first_loss(tmp_path / "images"), rtol=1e-5, atol=1e-7)


def test_interrupted_build_resumes_keeping_finished_shards(tmp_path, pair_dir, model_cache, monkeypatch):
    out = tmp_path / "cache"
    cfg = make_cfg(out, pair_dir)
    written = []
    original = cache_module._write_shard

    def write(tensors, path, start, stop):
        if len(written) == 2 and not resumed:
            raise KeyboardInterrupt
        written.append(path.name)
        original(tensors, path, start, stop)

    monkeypatch.setattr(cache_module, "_write_shard", write)
    resumed = False
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, out, shard_size=1, progress=False, cache_dir=model_cache)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(CacheError, match="incomplete"):
        train(make_cfg(tmp_path / "run", pair_dir, cache=out), cache_dir=model_cache)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    resumed = True
    build_cache(cfg, out, shard_size=1, progress=False, cache_dir=model_cache)
    assert written == [f"shard-0000{i}.safetensors" for i in range(4)]  # 0, 1 once; then only 2, 3
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert json.loads((out / "meta.json").read_text())["complete"]
    with pytest.raises(CacheError, match=r"other settings \(shard_size: 1 there, 2 now\)"):
        build_cache(cfg, out, shard_size=2, progress=False, cache_dir=model_cache)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data": {"resolution": 16}}, "built with data.resolution=32, but the config has data.resolution=16"),
        ({"model": {"pretrained": "MODEL"}}, "built with model.pretrained='tiny:sd', but the config has model.pretrained="),
        ({"model": {"latent_sampling": "sample"}}, "model.latent_sampling='mode'"),
        ({"data": {"max_pairs": 3}}, "built with num_pairs=4, but the pair list has num_pairs=3"),
        ({"data": {"random_flip": True}}, "data.random_flip: .* has no flipped copies"),
    ],
)
def test_mismatched_cache_is_refused(changes, message, tmp_path, pair_dir, model_cache, flip_cache):
    no_flip = tmp_path / "noflip"
    meta = json.loads((flip_cache / "meta.json").read_text())
    no_flip.mkdir()
    (no_flip / "meta.json").write_text(json.dumps({**meta, "flip_copies": False}))  # only meta.json is read before the check
    data = make_cfg(tmp_path, pair_dir, cache=no_flip).to_dict()
    for section, values in changes.items():
        data[section].update({k: str(model_cache / "sd") if v == "MODEL" else v for k, v in values.items()})
    with pytest.raises(CacheError, match=message):
        train(config_from_dict(data), cache_dir=model_cache)


def test_cache_cli(tmp_path, pair_dir, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "cache"
    common = ["cache", "--config", "configs/tiny.yaml", "--out", str(out), f"data.source={pair_dir}", "logging.progress=false"]
    assert main(common) == 2
    assert "data.center_crop: must be true" in capsys.readouterr().err
    assert main([*common, "data.center_crop=true", "--shard-size", "3", "--flip-copies", "--dtype", "float16"]) == 0
    assert "4 pairs cached in 2 shard(s)" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["flip_copies"] and meta["dtype"] == "float16" and meta["complete"]


def test_training_from_a_cache_takes_its_crop_without_repeating_it(tmp_path, pair_dir, model_cache, flip_cache):
    """The module docstring's pair: ``diffpo cache ... data.center_crop=true`` then ``diffpo train
    --config FILE data.cache=DIR``, the config keeping its default data.center_crop=false."""
    cfg = make_cfg(tmp_path / "run", pair_dir, cache=flip_cache, flip=True, center_crop=False)
    assert cfg.data.center_crop is False
    train(cfg, cache_dir=model_cache)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["center_crop"] is True  # the run records the crop it used
    explicit = make_cfg(tmp_path / "explicit", pair_dir, cache=flip_cache, flip=True)
    train(explicit, cache_dir=model_cache)
    assert first_loss(tmp_path / "run") == first_loss(tmp_path / "explicit")
