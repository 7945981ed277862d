"""Adding a loss touches one new file plus a registration: the losses here live in this test module,
are registered, train through ``diffpo.train.train`` unchanged, and are removed again.

The spec declares what the trainer must provide (the reference errors, the loser's prompt) and
the margin it logs; a trainer or ``LossSpec.metrics`` branch on a loss's name would make these fail.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, tiny_run_config as make_cfg

from diffpo.losses import LOSSES, LossSpec, register, unregister
from diffpo.train import train


def hinge_loss(err_w, err_l, ref_w=None, ref_l=None, gap: float = 0.05):
    """err_w + relu(gap - (err_l - err_w)): fit the chosen image, and keep the rejected one's error
    at least ``gap`` above it."""
    return err_w + F.relu(gap - (err_l - err_w))


def hinge_margin(err_w, err_l, ref_w=None, ref_l=None, gap: float = 0.05, **hparams):
    return err_l - err_w - gap  # > 0 once the hinge is satisfied


def ref_hinge_loss(err_w, err_l, ref_w, ref_l, gap: float = 0.05):
    """The hinge on the reference-relative gap ((err_l - ref_l) - (err_w - ref_w))."""
    return F.relu(gap - ((err_l - ref_l) - (err_w - ref_w)))


def ref_hinge_margin(err_w, err_l, ref_w, ref_l, **hparams):
    return (err_l - ref_l) - (err_w - ref_w)


SPECS = {
    "test_hinge": LossSpec("test_hinge", hinge_loss, needs_reference=False, hparams={"gap": 0.05}, ranges={"gap": (0, None, "inclusive")}, margin=hinge_margin),
    "test_ref_hinge": LossSpec("test_ref_hinge", ref_hinge_loss, needs_reference=True, hparams={"gap": 0.05}, ranges={"gap": (0, None, "inclusive")}, margin=ref_hinge_margin),
}


@pytest.fixture(params=sorted(SPECS))
def registered(request):
    spec = register(SPECS[request.param])
    try:
        yield spec
    finally:
        unregister(spec.name)
    assert spec.name not in LOSSES


def test_a_loss_defined_in_a_test_trains_through_the_trainer(registered, tmp_path, pair_dir, model_cache):
    from safetensors.torch import load_file

    out = tmp_path / registered.name
    result = train(make_cfg(out, pair_dir, loss={"name": registered.name, "gap": 0.1}), cache_dir=model_cache)
    assert result.steps == 2 and result.skipped_steps == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "err_w", "err_l", "margin", "implicit_accuracy"} <= set(m)
        # the reference runs exactly when the spec asks for it
        assert ("ref_w" in m and "ref_l" in m) == registered.needs_reference
        # the logged margin is this spec's own (linear, so the mean of means works), with the
        # configured hparam (gap=0.1) passed through
        if registered.needs_reference:
            expected = (m["err_l"] - m["ref_l"]) - (m["err_w"] - m["ref_w"])
        else:
            expected = m["err_l"] - m["err_w"] - 0.1
        assert m["margin"] == pytest.approx(expected, abs=1e-5)
    # LoRA's B matrices start at zero: a non-zero one means the optimizer changed the weights
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    b_norms = [t.abs().sum().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k]
    assert b_norms and max(b_norms) > 0


def test_a_registered_name_is_refused_twice_and_unregister_frees_it():
    spec = register(SPECS["test_hinge"])
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(SPECS["test_hinge"])
    finally:
        unregister("test_hinge")
    assert "test_hinge" not in LOSSES


def test_metrics_use_the_declared_margin_not_the_name():
    """A copy of mapo under another name logs mapo's margin; mapo with the default margin would not."""
    import dataclasses

    mapo = LOSSES["mapo"]
    err_w, err_l = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.3])
    renamed = dataclasses.replace(mapo, name="mapo_copy")
    assert renamed.metrics(err_w, err_l) == mapo.metrics(err_w, err_l)
    gap_only = dataclasses.replace(mapo, margin=LOSSES["sft"].margin)
    assert gap_only.metrics(err_w, err_l)["margin"] == pytest.approx((err_l - err_w).mean().item())
    assert mapo.metrics(err_w, err_l)["margin"] != pytest.approx((err_l - err_w).mean().item())
