"""Per-sample errors: shared noise/timestep per pair, targets for each prediction type."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.testing import assert_close

from diffpo.objectives import is_flow_matching, noise_pairs, per_sample_error, split_pairs


def latents(seed, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)


def test_pairs_share_noise_and_timestep_epsilon():
    sched = DDPMScheduler(num_train_timesteps=1000)
    w, l = latents(0)
    out = noise_pairs(sched, w, l, torch.Generator().manual_seed(1))
    assert out.noisy.shape == (6, 4, 8, 8) and out.timesteps.shape == (6,)
    assert_close(out.timesteps[:3], out.timesteps[3:])
    assert_close(out.target[:3], out.target[3:])  # epsilon target = the shared noise
    # noisy = sqrt(abar) x0 + sqrt(1-abar) eps, recomputed by hand
    abar = sched.alphas_cumprod[out.timesteps].reshape(-1, 1, 1, 1)
    x0 = torch.cat([w, l])
    assert_close(out.noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * out.target, rtol=1e-5, atol=1e-5)


def test_v_prediction_target_matches_get_velocity():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    w, l = latents(2)
    out = noise_pairs(sched, w, l, torch.Generator().manual_seed(3))
    eps_sched = DDPMScheduler(num_train_timesteps=1000)
    eps = noise_pairs(eps_sched, w, l, torch.Generator().manual_seed(3)).target  # same draws -> same noise
    expected = sched.get_velocity(torch.cat([w, l]), eps, out.timesteps)
    assert_close(out.target, expected)
    # and by hand: v = sqrt(abar) eps - sqrt(1-abar) x0
    abar = sched.alphas_cumprod[out.timesteps].reshape(-1, 1, 1, 1)
    assert_close(out.target, abar.sqrt() * eps - (1 - abar).sqrt() * torch.cat([w, l]), rtol=1e-5, atol=1e-5)


def test_flow_matching_velocity_target():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert is_flow_matching(sched) and not is_flow_matching(DDPMScheduler())
    w, l = latents(4)
    out = noise_pairs(sched, w, l, torch.Generator().manual_seed(5))
    x0 = torch.cat([w, l])
    noise = out.target + x0  # target = noise - x0
    assert_close(noise[:3], noise[3:])
    s = out.sigmas.reshape(-1, 1, 1, 1)
    assert_close(out.noisy, (1 - s) * x0 + s * noise, rtol=1e-5, atol=1e-5)
    assert ((out.sigmas > 0) & (out.sigmas <= 1)).all()
    assert_close(out.timesteps, out.sigmas * 1000, rtol=1e-4, atol=1e-2)


def test_generator_makes_draws_reproducible():
    sched = DDPMScheduler()
    w, l = latents(6)
    a = noise_pairs(sched, w, l, torch.Generator().manual_seed(7))
    b = noise_pairs(sched, w, l, torch.Generator().manual_seed(7))
    # assert_close returns None: each check is its own statement, or the second never runs
    assert_close(a.noisy, b.noisy)
    assert_close(a.timesteps, b.timesteps)


def test_per_sample_error_and_split():
    pred = torch.zeros(4, 2, 2)
    target = torch.tensor([1.0, 2.0, 3.0, 0.0]).reshape(4, 1, 1).expand(4, 2, 2)
    err = per_sample_error(pred, target)
    assert err.dtype == torch.float32
    assert_close(err, torch.tensor([1.0, 4.0, 9.0, 0.0]))
    w, l = split_pairs(err)
    assert_close(w, torch.tensor([1.0, 4.0]))
    assert_close(l, torch.tensor([9.0, 0.0]))
    # bf16 inputs are upcast before squaring
    assert per_sample_error(pred.bfloat16(), target.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="even number"):
        split_pairs(torch.zeros(3))
    with pytest.raises(ValueError, match="differ in shape"):
        per_sample_error(torch.zeros(2, 3), torch.zeros(2, 4))
