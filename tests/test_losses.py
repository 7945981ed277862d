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
    assert {n: s.needs_reference for n, s in LOSSES.items()} == {
        "sft": False, "diffusion_dpo": True, "dreambooth": False, "mapo": False, "dmpo": True, "fdpo": True, "kto": True,
    }
    # A preference needs one prompt: only DreamBooth (class prompt) and KTO (unpaired examples,
    # each with its own prompt) condition the second image on another prompt.
    assert {n for n, s in LOSSES.items() if s.loser_prompt == "rejected"} == {"dreambooth", "kto"}
    assert {n for n, s in LOSSES.items() if s.examples == "unpaired"} == {"kto"}
    assert dict(LOSSES["fdpo"].hparams) == {"beta": 5000.0, "divergence": "reverse_kl", "f_beta": 1.0, "alpha": 0.5}
    assert dict(LOSSES["kto"].hparams) == {"beta": 1000.0, "lambda_desirable": 1.0, "lambda_undesirable": 1.0}
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
        if spec.examples == "unpaired":
            ref.update(desirable_w=torch.tensor([True, False, True, True, False]), desirable_l=torch.tensor([False] * 5))
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


# ----------------------------------------------------------------------------------------------
# f-DPO (issue 18): Wang et al. 2023's logit f_beta * (f'(u_w) - f'(u_l)) on Diffusion-DPO's estimate
# log u_i = -0.5 * beta * (err_i - ref_i) / f_beta.
# ----------------------------------------------------------------------------------------------

# err_w 0.1, err_l 0.2, ref_w 0.15, ref_l 0.1, beta 10, f_beta 1: log u_w = 0.25, log u_l = -0.5.
_FDPO_ERRORS = (t(0.1), t(0.2), t(0.15), t(0.1))


@pytest.mark.parametrize(
    "divergence, logit",
    [
        # forward KL, f'(u) = -1/u:              -e^-0.25 + e^0.5                         = 0.8699204876
        ("forward_kl", 0.8699204876287233),
        # Jensen-Shannon, f'(u) = log(2u/(1+u)): log(2e^.25/(1+e^.25)) - log(2e^-.5/(1+e^-.5)) = 0.3981375643
        ("js", 0.39813756430126296),
        # alpha = 0.5, f'(u) = (1 - u^-a)/a:     2(1 - e^-0.125) - 2(1 - e^0.25)          = 0.8030570282
        ("alpha", 0.8030570282062919),
        # reverse KL, f'(u) = log u + 1:         0.25 - (-0.5)                            = 0.75 (DPO's h)
        ("reverse_kl", 0.75),
    ],
)
def test_fdpo_hand_computed(divergence, logit):
    loss = LOSSES["fdpo"](*_FDPO_ERRORS, beta=10.0, divergence=divergence, alpha=0.5)
    assert_close(loss, t(math.log1p(math.exp(-logit))))
    m = LOSSES["fdpo"].metrics(*_FDPO_ERRORS, beta=10.0, divergence=divergence, alpha=0.5)
    assert m["margin"] == pytest.approx(logit) and m["implicit_accuracy"] == 1.0


def test_fdpo_reverse_kl_is_diffusion_dpo_exactly():
    torch.manual_seed(0)
    errors = [torch.rand(64, dtype=torch.float32) for _ in range(4)]
    for beta in (1.0, 5000.0):
        for f_beta in (1.0, 0.1, 7.0):  # the split of the reward cancels for the reverse KL
            fdpo = LOSSES["fdpo"](*errors, beta=beta, divergence="reverse_kl", f_beta=f_beta)
            assert torch.equal(fdpo, LOSSES["diffusion_dpo"](*errors, beta=beta))


def test_fdpo_limits_of_the_alpha_divergence():
    from diffpo.losses import fdpo_loss

    torch.manual_seed(1)
    errors = [torch.rand(16, dtype=torch.float64) * 1e-3 for _ in range(4)]
    reverse = fdpo_loss(*errors, beta=5000.0, divergence="reverse_kl")
    forward = fdpo_loss(*errors, beta=5000.0, divergence="forward_kl")
    # alpha -> 0: the reverse KL (f' -> log u); alpha = 1: the forward KL's logit exactly (1 - 1/u vs -1/u)
    assert_close(fdpo_loss(*errors, beta=5000.0, divergence="alpha", alpha=1e-7), reverse, rtol=1e-5, atol=1e-6)
    assert_close(fdpo_loss(*errors, beta=5000.0, divergence="alpha", alpha=1.0), forward)
    # Since diffusion errors give only f_beta * log u, the alpha member at f_beta equals the forward
    # KL at f_beta / alpha (documented in fdpo_logit): the family is one-parameter on this estimate.
    assert_close(fdpo_loss(*errors, beta=5000.0, divergence="alpha", alpha=0.25, f_beta=2.0), fdpo_loss(*errors, beta=5000.0, divergence="forward_kl", f_beta=8.0))


def test_fdpo_every_member_is_log2_at_the_reference_and_falls_as_the_preference_grows():
    for divergence in ("reverse_kl", "forward_kl", "js", "alpha"):
        same = LOSSES["fdpo"](t(0.3), t(0.2), t(0.3), t(0.2), beta=10.0, divergence=divergence)
        assert_close(same, t(math.log(2)))
        better = LOSSES["fdpo"](t(0.25), t(0.2), t(0.3), t(0.2), beta=10.0, divergence=divergence)
        assert better < same, divergence


def test_fdpo_stays_finite_far_from_the_reference():
    # a winner 10 units of error worse than the reference: log u_w = -25000; exp(25000) overflows
    far = LOSSES["fdpo"](t(10.0), t(0.0), t(0.0), t(0.0), divergence="forward_kl")
    assert torch.isfinite(far).all() and far.item() > 1e30


def test_fdpo_divergence_is_a_checked_choice():
    with pytest.raises(ValueError, match=r"loss.divergence=kl: outside the range of 'fdpo' divergence, \{reverse_kl, forward_kl, js, alpha\}"):
        LOSSES["fdpo"](*_FDPO_ERRORS, divergence="kl")
    with pytest.raises(ValueError, match=r"loss.alpha=1: outside"):
        LOSSES["fdpo"](*_FDPO_ERRORS, alpha=1.0)


# ----------------------------------------------------------------------------------------------
# Diffusion-KTO (issue 18): unpaired examples, two per row.
# ----------------------------------------------------------------------------------------------


def test_kto_hand_computed():
    from diffpo.losses import kto_loss

    # g = -(err - ref) = [0.1, -0.1]; mean 0 -> z_ref = 0; beta 10:
    # desirable: 1 - sigmoid(10 * 0.1) = 0.2689414 ; undesirable: 1 - sigmoid(-10 * -0.1) = 0.2689414
    loss = kto_loss(t(0.1, 0.3), t(0.2, 0.2), torch.tensor([True, False]), beta=10.0)
    assert_close(loss, t(0.2689414213699951, 0.2689414213699951))
    # g = [0.2, 0.1]; z_ref = 0.15: desirable 1 - sigmoid(0.5) = 0.3775407, undesirable (lambda_u = 2) 2 * (1 - sigmoid(0.5))
    loss = kto_loss(t(0.1, 0.1), t(0.3, 0.2), torch.tensor([True, False]), beta=10.0, lambda_undesirable=2.0)
    assert_close(loss, t(0.3775406687981454, 0.7550813375962908))
    # a negative mean log-ratio is clamped: z_ref = max(0, -0.2) = 0 -> 1 - sigmoid(10 * -0.2)
    assert_close(kto_loss(t(0.4), t(0.2), torch.tensor([True]), beta=10.0), t(1 - 1 / (1 + math.exp(2.0))))


def test_kto_reference_point_carries_no_gradient():
    from diffpo.losses import kto_loss

    err = t(0.1, 0.3).requires_grad_()
    kto_loss(err, t(0.2, 0.2), torch.tensor([True, True]), beta=10.0).sum().backward()
    # z_ref = 0.0 (mean of [0.1, -0.1]); dL_i/derr_i = beta * s(1-s) at x_i, and nothing through z_ref
    s0, s1 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))
    assert_close(err.grad, t(10 * s0 * (1 - s0), 10 * s1 * (1 - s1)))


def test_kto_all_desirable_at_small_beta_moves_like_sft():
    """Issue 18's limiting case: with every image desirable, d loss / d err = beta * s'(x) -> beta/4
    as beta -> 0, so KTO's gradient is SFT's scaled by beta/4 (same direction)."""
    torch.manual_seed(0)
    err_w, err_l = torch.rand(8, dtype=torch.float64, requires_grad=True), torch.rand(8, dtype=torch.float64, requires_grad=True)
    ref_w, ref_l = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    yes = torch.ones(8, dtype=torch.bool)
    beta = 1e-4
    LOSSES["kto"](err_w, err_l, ref_w, ref_l, desirable_w=yes, desirable_l=yes, beta=beta).mean().backward()
    # SFT on all 16 images: d mean(err) / d err_i = 1/16
    assert_close(err_w.grad, torch.full((8,), beta / 4 / 16, dtype=torch.float64), rtol=1e-6, atol=0)
    assert_close(err_l.grad, torch.full((8,), beta / 4 / 16, dtype=torch.float64), rtol=1e-6, atol=0)


def test_kto_rows_average_their_two_examples_and_need_labels():
    from diffpo.losses import kto_loss

    err_w, err_l, ref_w, ref_l = t(0.1, 0.2), t(0.3, 0.1), t(0.2, 0.2), t(0.2, 0.3)
    yes_no, no_yes = torch.tensor([True, False]), torch.tensor([False, True])
    rows = LOSSES["kto"](err_w, err_l, ref_w, ref_l, desirable_w=yes_no, desirable_l=no_yes, beta=10.0)
    each = kto_loss(torch.cat([err_w, err_l]), torch.cat([ref_w, ref_l]), torch.cat([yes_no, no_yes]), beta=10.0)
    assert_close(rows, (each[:2] + each[2:]) / 2)
    m = LOSSES["kto"].metrics(err_w, err_l, ref_w, ref_l, desirable_w=yes_no, desirable_l=no_yes, beta=10.0)
    assert 0.0 <= m["implicit_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="unpaired examples: it needs their labels"):
        LOSSES["kto"](err_w, err_l, ref_w, ref_l)
