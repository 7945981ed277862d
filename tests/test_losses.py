"""Objectives against hand-computed values and their invariants (LOSSES.md)."""

import math

import pytest
import torch
from torch.testing import assert_close

from diffpo.losses import LOSSES, get_loss, mapo_score


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_registry_contract():
    assert set(LOSSES) >= {"sft", "diffusion_dpo", "mapo", "dmpo"}
    assert {n: s.needs_reference for n, s in LOSSES.items()} == {"sft": False, "diffusion_dpo": True, "dreambooth": False, "mapo": False, "dmpo": True}
    # Only DreamBooth conditions the loser on its own (class) prompt; a preference needs one prompt.
    assert {n for n, s in LOSSES.items() if s.loser_prompt == "rejected"} == {"dreambooth"}
    assert dict(LOSSES["mapo"].hparams) == {"beta": 0.1, "snr_value": 0.5, "num_train_timesteps": 1000}
    assert dict(LOSSES["diffusion_dpo"].hparams) == {"beta": 5000.0}
    assert LOSSES["dmpo"].hparams["alpha"] == pytest.approx(math.log(999))
    assert LOSSES["dmpo"].hparams["beta"] == 5000.0


def test_unknown_hparam_and_missing_reference_are_clear_errors():
    with pytest.raises(ValueError, match="no hparam 'gamma'.*valid: beta"):
        LOSSES["diffusion_dpo"](t(1.0), t(1.0), t(1.0), t(1.0), gamma=1.0)
    with pytest.raises(ValueError, match="needs the reference"):
        LOSSES["dmpo"](t(1.0), t(1.0))
    with pytest.raises(ValueError, match="unknown loss 'ppo'.*mapo"):
        get_loss("ppo")


def test_sft_is_err_w():
    assert_close(LOSSES["sft"](t(0.3, 0.1), t(9.0, 9.0)), t(0.3, 0.1))


def test_dreambooth_hand_computed():
    # DreamBooth eq. 2: err_w + lambda * err_l ; 0.3 + 1.0*0.5 = 0.8 ; 0.1 + 0.25*0.4 = 0.2
    assert_close(LOSSES["dreambooth"](t(0.3), t(0.5)), t(0.8))
    assert_close(LOSSES["dreambooth"](t(0.1), t(0.4), prior_weight=0.25), t(0.2))
    # unlike every preference objective, a larger err_l *raises* the loss: the class prior is kept, not pushed away
    assert LOSSES["dreambooth"](t(0.3), t(0.6)) > LOSSES["dreambooth"](t(0.3), t(0.5))


def test_dpo_hand_computed():
    # h = -0.5*10*((0.1-0.15) - (0.2-0.15)) = 0.5 ; loss = log(1 + e^-0.5) = 0.474077...
    loss = LOSSES["diffusion_dpo"](t(0.1), t(0.2), t(0.15), t(0.15), beta=10.0)
    assert_close(loss, t(0.4740769841801067))


def test_dpo_is_log2_when_model_equals_reference():
    err_w, err_l = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    assert_close(LOSSES["diffusion_dpo"](err_w, err_l, err_w.clone(), err_l.clone()), torch.full((8,), math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("name", ["diffusion_dpo", "mapo", "dmpo"])
def test_loss_falls_when_err_w_falls_or_err_l_rises(name):
    spec = LOSSES[name]
    ref = dict(ref_w=t(0.5), ref_l=t(0.5)) if spec.needs_reference else {}
    # dmpo is minimised at h = alpha; stay on the side h < alpha where it decreases in h.
    hp = {"beta": 1.0} if name != "mapo" else {}
    base = spec(t(0.5), t(0.5), **ref, **hp)
    assert spec(t(0.45), t(0.5), **ref, **hp) < base
    assert spec(t(0.5), t(0.55), **ref, **hp) < base


def test_mapo_score_hand_computed_and_stable_near_zero():
    # s(m) = a m / (e^{a m} - 1): s(0.2) with a = 0.5 -> 0.1 / (e^0.1 - 1)
    assert_close(mapo_score(t(0.2), 0.5), t(0.1 / math.expm1(0.1)))
    assert_close(mapo_score(t(0.0), 0.5), t(1.0))
    tiny = t(1e-9, 1e-6, 1e-4, 3e-4)
    expected = torch.tensor([0.5 * m / math.expm1(0.5 * m) for m in tiny.tolist()], dtype=torch.float64)
    assert_close(mapo_score(tiny, 0.5), expected)
    # float32 near zero: finite, in (0, 1], and decreasing in the error
    small32 = torch.tensor([0.0, 1e-8, 1e-5, 1e-3, 1e-1], dtype=torch.float32)
    values = mapo_score(small32, 0.5)
    assert torch.isfinite(values).all() and (values <= 1).all() and (values.diff() <= 0).all()


def test_mapo_hand_computed():
    # T=10, a=0.5, beta=0.1: margin = 10*(s(0.2) - s(0.4)); loss = 0.2 + 0.1*log(1+e^-margin)
    s = lambda m: 0.5 * m / math.expm1(0.5 * m)
    margin = 10 * (s(0.2) - s(0.4))
    expected = 0.2 + 0.1 * math.log1p(math.exp(-margin))
    assert_close(LOSSES["mapo"](t(0.2), t(0.4), num_train_timesteps=10), t(expected))
    # with the defaults (T=1000) the margin term is ~0 for a clear preference: loss ~ err_w
    assert_close(LOSSES["mapo"](t(0.2), t(0.4)), t(0.2), atol=1e-10, rtol=0)


def test_mapo_finite_with_gradient_as_errors_go_to_zero():
    for value in [1e-2, 1e-5, 1e-8, 0.0]:
        err_w = torch.tensor([value], dtype=torch.float32, requires_grad=True)
        err_l = torch.tensor([value * 2], dtype=torch.float32, requires_grad=True)
        loss = LOSSES["mapo"](err_w, err_l).sum()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(err_w.grad).all() and torch.isfinite(err_l.grad).all()


def test_mapo_needs_no_reference_and_ignores_it():
    a = LOSSES["mapo"](t(0.3), t(0.4))
    b = LOSSES["mapo"](t(0.3), t(0.4), ref_w=t(9.0), ref_l=t(0.0))
    assert_close(a, b)


def _h(err_w, err_l, ref_w, ref_l, beta):
    return -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))


def test_dmpo_is_bernoulli_kl():
    beta, alpha = 10.0, 1.5
    h = _h(0.1, 0.3, 0.2, 0.2, beta)  # = 1.0
    p, q = 1 / (1 + math.exp(-h)), 1 / (1 + math.exp(-alpha))
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert_close(LOSSES["dmpo"](t(0.1), t(0.3), t(0.2), t(0.2), beta=beta, alpha=alpha), t(kl))


def test_dmpo_zero_with_zero_gradient_at_h_equal_alpha():
    alpha, beta = math.log(999), 5000.0
    # choose err_w so that h = alpha exactly: h = -0.5*beta*(err_w - err_l) with equal refs
    err_l = 0.5
    err_w = torch.tensor([err_l - 2 * alpha / beta], dtype=torch.float64, requires_grad=True)
    loss = LOSSES["dmpo"](err_w, t(err_l), t(0.3), t(0.3), beta=beta, alpha=alpha)
    assert_close(loss.detach(), t(0.0), atol=1e-12, rtol=0)
    loss.sum().backward()
    assert abs(err_w.grad.item()) < 1e-8


def test_dmpo_nonnegative_and_gradient_formula():
    h = torch.linspace(-30, 30, 121, dtype=torch.float64)
    alpha = 2.0
    # with beta = 2, err_l = ref = 0: h = -(err_w) -> err_w = -h
    err_w = (-h).clone().requires_grad_(True)
    zeros = torch.zeros_like(h)
    loss = LOSSES["dmpo"](err_w, zeros, zeros, zeros, beta=2.0, alpha=alpha)
    assert (loss >= -1e-12).all() and torch.isfinite(loss).all()
    loss.sum().backward()
    # dloss/dh = sigmoid(h) sigmoid(-h) (h - alpha); dh/derr_w = -1
    expected = -(torch.sigmoid(h) * torch.sigmoid(-h) * (h - alpha))
    assert_close(err_w.grad, expected)


def test_dmpo_forward_kl_is_label_smoothed_dpo():
    """KL(q||p) = -q log p - (1-q) log(1-p) - H(q): label-smoothed DPO up to a constant."""
    h = torch.linspace(-5, 5, 11, dtype=torch.float64)
    q = 0.9
    forward_kl = q * (math.log(q) - torch.nn.functional.logsigmoid(h)) + (1 - q) * (math.log(1 - q) - torch.nn.functional.logsigmoid(-h))
    smoothed_dpo = -q * torch.nn.functional.logsigmoid(h) - (1 - q) * torch.nn.functional.logsigmoid(-h)
    entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert_close(forward_kl, smoothed_dpo - entropy)
    # and with q -> 1 it is exactly the registered DPO loss on the same h
    zeros = torch.zeros_like(h)
    assert_close(LOSSES["diffusion_dpo"](-h, zeros, zeros, zeros, beta=2.0), -torch.nn.functional.logsigmoid(h))


def test_metrics_shared_across_objectives():
    err_w, err_l, ref_w, ref_l = t(0.1, 0.4), t(0.3, 0.2), t(0.2, 0.2), t(0.2, 0.2)
    m = LOSSES["diffusion_dpo"].metrics(err_w, err_l, ref_w, ref_l, beta=10.0)
    # h = [-5*(-0.1-0.1), -5*(0.2-0.0)] = [1.0, -1.0]
    assert m["implicit_accuracy"] == pytest.approx(0.5)
    assert m["margin"] == pytest.approx(0.0, abs=1e-6)
    assert m["err_w"] == pytest.approx(0.25) and m["ref_l"] == pytest.approx(0.2)
    m = LOSSES["mapo"].metrics(err_w, err_l)
    assert m["implicit_accuracy"] == pytest.approx(0.5) and "ref_w" not in m
    m = LOSSES["sft"].metrics(t(0.1, 0.2, 0.3), t(0.2, 0.1, 0.4))
    assert m["implicit_accuracy"] == pytest.approx(2 / 3)


def test_losses_are_per_pair_shape_and_differentiable():
    for name, spec in LOSSES.items():
        err_w = torch.rand(5, requires_grad=True)
        err_l = torch.rand(5)
        ref = dict(ref_w=torch.rand(5), ref_l=torch.rand(5)) if spec.needs_reference else {}
        loss = spec(err_w, err_l, **ref)
        assert loss.shape == (5,), name
        loss.mean().backward()
        assert err_w.grad is not None and torch.isfinite(err_w.grad).all(), name


def _dL_dh(name: str, h: float, alpha: float = math.log(999)) -> float:
    """dL/dh of a reference-using loss at margin h (beta = 2, equal refs: h = -(err_w - err_l))."""
    err_w = torch.tensor([-h], dtype=torch.float64, requires_grad=True)
    hparams = {"beta": 2.0, **({"alpha": alpha} if name == "dmpo" else {})}
    LOSSES[name](err_w, t(0.0), t(0.0), t(0.0), **hparams).sum().backward()
    return -err_w.grad.item()  # dh/derr_w = -1


def test_dmpo_pushes_harder_than_dpo_at_zero_margin_and_goes_flat_past_alpha():
    """The docstring's claims (issue 17): at h = 0 DMPO's pull is -alpha/4 against DPO's -1/2; past
    alpha it pulls back, but by h = 3 alpha the gradient is ~1e-8 (flat: no bound on overshoot)."""
    alpha = math.log(999)
    assert _dL_dh("dmpo", 0.0) == pytest.approx(-alpha / 4)
    assert _dL_dh("diffusion_dpo", 0.0) == pytest.approx(-0.5)
    assert _dL_dh("dmpo", 2 * alpha) > 0  # past alpha: a pull back ...
    assert 0 < _dL_dh("dmpo", 3 * alpha) < 1e-7  # ... that has faded to nothing at 3 alpha
    assert _dL_dh("dmpo", 44.0) < 1e-15  # the margins the shapes-world runs logged
