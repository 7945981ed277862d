"""SDXL, SD3 and Flux families (and SD 2.x v-prediction) end to end on tiny in-process models:
two LoRA steps through the trainer, the LoRA round trip into the matching diffusers pipeline, a
full fine-tune for SDXL, and the conditioning each family builds."""

from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_run_config

from diffpo.config import ModelConfig
from diffpo.models import FAMILIES, detect_family, load_components
from diffpo.objectives import is_flow_matching
from diffpo.train import train

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def make_cfg(out: Path, data: Path, family: str, **sections):
    return tiny_run_config(out, data, pretrained=f"tiny:{family}", **sections)


def check_metrics(out: Path, with_reference: bool):
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "lr", "err_w", "err_l", "margin", "implicit_accuracy"} <= set(m)
        assert m["loss"] is not None and torch.isfinite(torch.tensor(m["loss"]))
        assert ("ref_w" in m) == with_reference
    return metrics


def fixed_inputs(components, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, components.vae.config.latent_channels, 16, 16, generator=generator)
    with torch.no_grad():
        cond = components.family.encode_prompts(components, ["a red circle on a gray background", "a blue square"][:batch])
    flow = is_flow_matching(components.scheduler)
    timesteps = components.scheduler.timesteps[torch.tensor([100, 700])[:batch]] if flow else torch.tensor([50, 600])[:batch]
    return latents, timesteps, cond


def denoiser_output(family, components, network, inputs):
    latents, timesteps, cond = inputs
    with torch.no_grad():
        return family.predict(components, network, latents, timesteps, cond)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_trains_lora_and_round_trips(family, tmp_path, pair_dir, model_cache):
    import diffusers

    out = tmp_path / family
    loss = "diffusion_dpo" if family == "sd3" else "mapo"  # one reference-based objective on a flow model
    result = train(make_cfg(out, pair_dir, family, loss={"name": loss}), cache_dir=model_cache)
    assert result.steps == 2 and result.skipped_steps == 0
    metrics = check_metrics(out, with_reference=loss == "diffusion_dpo")
    if loss == "diffusion_dpo":
        assert metrics[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # model == reference at step 1
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()

    # The LoRA loads into the matching diffusers pipeline and changes the denoiser's output.
    base_dir = model_cache / family
    assert detect_family(str(base_dir)) == family
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(base_dir)
    components = load_components(ModelConfig(pretrained=str(base_dir)))
    fam = components.family
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    inputs = fixed_inputs(components)
    before = denoiser_output(fam, components, denoiser, inputs)
    assert before.shape == inputs[0].shape and torch.isfinite(before).all()
    pipe.load_lora_weights(out / "final")
    after = denoiser_output(fam, components, denoiser, inputs)
    assert (after - before).abs().max() > 1e-5


def test_sdxl_full_finetune_saves_a_loadable_pipeline(tmp_path, pair_dir, model_cache):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = tmp_path / "full"
    cfg = make_cfg(out, pair_dir, "sdxl", model={"family": "sdxl", "lora": {"enabled": False}}, loss={"name": "dmpo"})
    train(cfg, cache_dir=model_cache)
    check_metrics(out, with_reference=True)
    tuned = StableDiffusionXLPipeline.from_pretrained(out / "final")
    base_unet = UNet2DConditionModel.from_pretrained(model_cache / "sdxl", subfolder="unet")
    base_state = base_unet.state_dict()
    changed = [n for n, p in tuned.unet.named_parameters() if not torch.equal(p, base_state[n])]
    assert len(changed) > 0.5 * len(base_state)
    base = StableDiffusionXLPipeline.from_pretrained(model_cache / "sdxl")
    for a, b in zip(tuned.text_encoder_2.parameters(), base.text_encoder_2.parameters()):
        assert torch.equal(a, b)


def test_sdxl_conditioning(model_cache):
    components = load_components(ModelConfig(pretrained="tiny:sdxl"), cache_dir=model_cache)
    cond = components.family.encode_prompts(components, ["a red circle", "a blue square"])
    assert cond["encoder_hidden_states"].shape == (2, 16, 64)  # 32 + 32 features, 16 tokens
    assert cond["text_embeds"].shape == (2, 32)
    latents = torch.zeros(2, 4, 16, 16)
    ids = components.family.time_ids(components, latents)
    assert ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # resolution = latent size * VAE factor 2


def test_sd3_and_flux_conditioning(model_cache):
    sd3 = load_components(ModelConfig(pretrained="tiny:sd3"), cache_dir=model_cache)
    cond = sd3.family.encode_prompts(sd3, ["a red circle"])
    # CLIP tokens (16, 16 + 16 features padded to the T5 width 32) then T5 tokens (16)
    assert cond["encoder_hidden_states"].shape == (1, 32, 32) and cond["pooled_projections"].shape == (1, 32)
    flux = load_components(ModelConfig(pretrained="tiny:flux"), cache_dir=model_cache)
    cond = flux.family.encode_prompts(flux, ["a red circle"])
    assert cond["encoder_hidden_states"].shape == (1, 16, 32) and cond["pooled_projections"].shape == (1, 32)
    # packing round trip: the prediction comes back (B, C, H, W)
    latents = torch.randn(1, 4, 16, 16)
    pred = flux.family.predict(flux, flux.network, latents, flux.scheduler.timesteps[:1], cond)
    assert pred.shape == latents.shape


def test_sd2_v_prediction_trains_against_the_velocity(tmp_path, pair_dir, model_cache):
    from diffpo.objectives import noise_pairs

    components = load_components(ModelConfig(pretrained="tiny:sd2v"), cache_dir=model_cache)
    assert components.family.name == "sd" and components.scheduler.config.prediction_type == "v_prediction"
    x_w, x_l = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    noised = noise_pairs(components.scheduler, x_w, x_l, torch.Generator().manual_seed(0))
    x0 = torch.cat([x_w, x_l])
    alpha_bar = components.scheduler.alphas_cumprod[noised.timesteps].reshape(-1, 1, 1, 1)
    noise = (noised.noisy - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    torch.testing.assert_close(noised.target, velocity, rtol=1e-4, atol=1e-4)

    out = tmp_path / "sd2v"
    result = train(make_cfg(out, pair_dir, "sd2v", loss={"name": "dmpo"}), cache_dir=model_cache)
    assert result.steps == 2
    check_metrics(out, with_reference=True)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_families_are_registered():
    assert {"sd", "sdxl", "sd3", "flux"} <= set(FAMILIES)


@pytest.mark.parametrize("name", ["sdxl_mapo_pickapic", "sdxl_mapo_pickapic_lora", "sd15_dpo", "sd15_dmpo", "sd35m_mapo_lora", "sdxl_mapo_fast"])
def test_shipped_configs_name_a_registered_family(name):
    from diffpo.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.model.family in FAMILIES
    assert cfg.data.source == "yuvalkirstain/pickapic_v2" and cfg.data.ties == "drop"
    # the fast path where it changes no result: every GPU recipe compiles its blocks
    assert cfg.train.compile == "regional"
    if name == "sdxl_mapo_fast":  # bf16 weights keep float32 masters; same global batch as the recipe
        assert cfg.train.weight_dtype == "bf16" and cfg.train.mixed_precision == "bf16" and cfg.data.cache
        recipe = load_config(Path(__file__).resolve().parents[1] / "configs" / "sdxl_mapo_pickapic.yaml")
        per_step = lambda c: c.train.batch_size * c.train.gradient_accumulation_steps  # noqa: E731
        assert per_step(cfg) == per_step(recipe) and cfg.loss == recipe.loss
        assert cfg.train.use_8bit_adam and recipe.train.use_8bit_adam and cfg.model.gradient_checkpointing is False
        assert cfg.train.adam_8bit_kernel == "diffpo"  # the measured-fastest 8-bit update (BENCHMARKS.md, issue 16)
        assert cfg.train.compile_dynamic is False and not cfg.train.compile_options  # measured: static graphs paid, the cat option changed nothing
        assert cfg.train.fused_geglu  # measured: 416 -> 405 ms per step on one H200


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_prompt_encoding_matches_the_pipeline(family, model_cache):
    import diffusers

    components = load_components(ModelConfig(pretrained=f"tiny:{family}"), cache_dir=model_cache)
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(model_cache / family)
    prompts = ["a red circle on a gray background", "a blue square"]
    with torch.no_grad():
        ours = components.family.encode_prompts(components, prompts)
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
            theirs = {"encoder_hidden_states": embeds, "text_embeds": pooled}
        elif family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=16)
            theirs = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompts, max_sequence_length=16)
            theirs = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_what_a_family_declares_matches_its_tiny_model(family, model_cache):
    """The class attributes other code reads (family: auto, tiny ids, compile blocks, the
    benchmarks' encoder classes and pooled key) are true of the model the family builds."""
    from diffpo.fastpath import compile_network, compiled_regions
    from diffpo.models import resolve_pretrained

    cls = FAMILIES[family]
    assert family in cls.tiny_models  # tiny:<family> is declared by the family itself
    components = load_components(ModelConfig(pretrained=resolve_pretrained(f"tiny:{family}", model_cache)))
    assert type(components.family) is cls  # family: auto went through detect_pipeline_classes
    assert tuple(type(e).__name__ for e in components.text_encoders) == cls.text_encoder_classes
    with torch.no_grad():
        cond = cls().encode_prompts(components, ["a red circle"])
    assert (set(cond) - {"encoder_hidden_states"}) == ({cls.pooled_text_key} if cls.pooled_text_key else set())
    network = components.network
    compile_network(network, "regional", cls.compile_blocks)
    compiled = {type(network.get_submodule(name)).__name__ for name in compiled_regions(network)}
    assert compiled == set(cls.compile_blocks)  # every declared block exists, nothing else compiled


@pytest.mark.parametrize("kernel", ["bitsandbytes", "diffpo"])
@pytest.mark.parametrize("family", ["sd", "sd2v", "sdxl", "sd3", "flux"])
def test_fast_path_full_finetune_trains_every_family(family, kernel, tmp_path, pair_dir, model_cache):
    """The fast path's optimizer (bf16 weights, float32 masters in flat buckets, 8-bit moments by
    bitsandbytes' kernel or diffpo's, the shipped fast config's, the gradients taken before the
    step's host sync, clipping inside the update: active here) is independent of the network: two
    full fine-tuning steps per family, every trained weight finite, most of them moved, the logged
    norms above max_grad_norm."""
    from safetensors.torch import load_file

    out = tmp_path / family
    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "use_8bit_adam": True, "adam_8bit_kernel": kernel,
            "max_grad_norm": 0.05, "learning_rate": 1e-3, "checkpoint_every": 2}
    result = train(make_cfg(out, pair_dir, family, model={"lora": {"enabled": False}}, train=fast), cache_dir=model_cache)
    assert result.steps == 2 and result.skipped_steps == 0
    metrics = check_metrics(out, with_reference=False)
    assert all(m["grad_norm"] > 0.05 for m in metrics)  # clipping was active
    network = "unet" if family in ("sd", "sd2v", "sdxl") else "transformer"
    tuned = load_file(next((out / "final" / network).glob("*.safetensors")))
    base = load_file(next((model_cache / family / network).glob("*.safetensors")))
    assert all(torch.isfinite(value).all() for value in tuned.values())
    moved = [name for name, value in tuned.items() if not torch.equal(value.float(), base[name].float())]
    assert len(moved) > 0.5 * len(base)
