"""Preference objectives as pure per-pair functions, and their registry.

Every objective takes per-sample denoising errors (see ``diffpo.objectives``): ``err_w`` and
``err_l`` of shape (B,) for the preferred and dispreferred image of each pair, plus the frozen
reference model's errors ``ref_w``/``ref_l`` when it needs them, and returns the per-pair loss
of shape (B,). The training loss is its mean. A lower error means a higher likelihood (one-step
diffusion ELBO), so "the model prefers x_w" means ``err_w < err_l``.

Formulas: ../shared/LOSSES.md. Adding an objective = one function + one ``register`` call + tests;
the trainer never changes (tests/test_extending.py does it from a test module).

Public contract::

    from diffpo.losses import LOSSES
    spec = LOSSES["mapo"]
    spec.needs_reference          # bool: the trainer computes ref_w/ref_l only then
    spec.loser_prompt             # "pair" | "rejected": which prompt conditions the loser image
    spec.margin                   # the preference logit logged as "margin"
    spec.examples                 # "pairs" | "unpaired": unpaired objectives also take desirable_w/_l
    loss = spec(err_w, err_l, ref_w=None, ref_l=None, beta=0.1)   # (B,)
    spec.metrics(err_w, err_l, ref_w, ref_l, **hparams)           # dict[str, float]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "LOSSES", "LossSpec", "Choice", "register", "unregister", "dpo_logit", "mapo_score", "get_loss", "format_range",
    "error_gap_margin", "dpo_margin", "mapo_margin", "fdpo_logit", "fdpo_loss", "kto_loss", "kto_logit", "kto_margin", "F_DIVERGENCES",
]


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def dpo_logit(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """Diffusion-DPO's implicit reward margin h (Wallace et al. 2023, eq. 14).

    h = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l)). h > 0 means the model has improved the
    preferred image's likelihood relative to the reference more than the dispreferred one's.
    Follows SalesforceAIResearch/DiffusionDPO train.py (``inside_term``).
    """
    return -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))


def mapo_score(err: Tensor, snr_value: float) -> Tensor:
    """MaPO's bounded, decreasing likelihood stand-in s(m) = a*m / (exp(a*m) - 1).

    Follows mapo-t2i/mapo utils.py (``compute_loss``), which writes it with exp(); we use expm1
    and the removable singularity's limit s(0) = 1 so that err -> 0 stays finite and exact.
    For x = a*m: s = x / expm1(x); near 0, s ~ 1 - x/2 + x^2/12.
    """
    x = snr_value * err
    small = x.abs() < 1e-4
    safe_x = torch.where(small, torch.ones_like(x), x)
    exact = safe_x / torch.expm1(safe_x)
    series = 1.0 - x / 2.0 + x * x / 12.0
    return torch.where(small, series, exact)


# ----------------------------------------------------------------------------------------------
# The objectives. Each returns the per-pair loss (B,).
# ----------------------------------------------------------------------------------------------


def sft_loss(err_w: Tensor, err_l: Tensor, ref_w=None, ref_l=None) -> Tensor:
    """Supervised fine-tuning on the preferred image: loss = err_w (err_l is ignored)."""
    return err_w


def diffusion_dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float = 5000.0) -> Tensor:
    """Diffusion-DPO: loss = -log sigmoid(h). Equals log 2 when model == reference."""
    return -F.logsigmoid(dpo_logit(err_w, err_l, ref_w, ref_l, beta))


def dreambooth_loss(err_w: Tensor, err_l: Tensor, ref_w=None, ref_l=None, prior_weight: float = 1.0) -> Tensor:
    """DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
    Subject-Driven Generation", eq. 2): loss = err_w + prior_weight * err_l.

    Not a preference objective: two likelihood terms. err_w is the subject image under the
    identifier prompt ("a sks dog"); err_l is a class-prior image (a base-model sample of the
    class prompt, "a dog") under *its own* prompt, the pair's ``rejected_prompt``: the trainer
    conditions the loser half on it because this spec sets ``loser_prompt="rejected"``. The second
    term, "class-specific prior preservation", keeps the class prompt drawing what the base drew.
    prior_weight is the paper's lambda (1 in the paper and in diffusers' train_dreambooth.py).
    Departure from the paper: the two terms share one noise sample and timestep per pair (the
    paper draws them independently); each term's expectation, hence the expected gradient, is
    the same, only the two estimates become correlated.
    """
    return err_w + prior_weight * err_l


def mapo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_w=None,
    ref_l=None,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """MaPO (Hong et al. 2024): loss = err_w - beta * log sigmoid(T * (s(err_w) - s(err_l))).

    The first term (weight 1) is the likelihood term on the preferred image; the second widens the
    margin between the two bounded scores. Reference-free. Follows mapo-t2i/mapo utils.py.
    """
    margin = mapo_margin(err_w, err_l, snr_value=snr_value, num_train_timesteps=num_train_timesteps)
    return err_w - beta * F.logsigmoid(margin)


def dmpo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float = 5000.0,
    alpha: float = math.log(999.0),
) -> Tensor:
    """DMPO read as the EXO-style reverse KL over the pair (see LOSSES.md: our reading).

    p = sigmoid(h) is the model's implied probability that x_w beats x_l, q = sigmoid(alpha) the
    target. loss = KL(p || q) for Bernoulli p, q: zero exactly at h = alpha, with gradient
    dL/dh = sigmoid(h)sigmoid(-h)(h - alpha). What that means in practice:
    - at h = 0 the pull is -alpha/4 (about -1.73 at the default alpha = ln 999), 3.5 times DPO's
      -1/2 at equal beta: DMPO pushes harder at the start;
    - past alpha the pull back is real but fades like h*exp(-h): at h = 3*alpha it is about 1e-8,
      so the loss is flat there and nothing stops a margin that overshoots (the shapes-world runs
      logged margins of 44-114 against alpha = 6.9). It does not keep margins near alpha: it stops
      pushing at alpha and pulls back only weakly, where DPO's push fades like exp(-h) but never
      reverses. At large margins both losses are flat.
    This is diffpo's reading of DMPO (no public code or formula; LOSSES.md). Log-sigmoids keep it
    stable for large |h|.
    """
    h = dpo_logit(err_w, err_l, ref_w, ref_l, beta)
    log_p, log_1mp = F.logsigmoid(h), F.logsigmoid(-h)
    alpha_t = torch.as_tensor(alpha, dtype=h.dtype, device=h.device)
    log_q, log_1mq = F.logsigmoid(alpha_t), F.logsigmoid(-alpha_t)
    p = torch.sigmoid(h)
    return p * (log_p - log_q) + (1.0 - p) * (log_1mp - log_1mq)


# ----------------------------------------------------------------------------------------------
# The f-divergence family of Diffusion-DPO (f-DPO)
# ----------------------------------------------------------------------------------------------

# f'(u) of each divergence D_f(pi || pi_ref) as a function of log u, u = pi_theta / pi_ref
# (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
# Divergence Constraints", Table 1). Written on log u so that large ratios stay finite.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def _f_prime(log_u: Tensor, divergence: str, alpha: float) -> Tensor:
    if divergence == "reverse_kl":  # f(u) = u log u                     f'(u) = log u + 1
        return log_u + 1.0
    if divergence == "forward_kl":  # f(u) = -log u                      f'(u) = -1/u
        return -torch.exp(-log_u)
    if divergence == "js":  # f(u) = u log u - (1+u) log((1+u)/2)          f'(u) = log(2u / (1+u))
        return math.log(2.0) - F.softplus(-log_u)  # = log 2 + log u - log(1 + u), stable for any u
    if divergence == "alpha":  # f(u) = (u^(1-a) - (1-a)u - a) / (a(a-1))  f'(u) = (1 - u^(-a)) / a
        return -torch.expm1(-alpha * log_u) / alpha
    raise ValueError(f"unknown divergence {divergence!r} (valid: {', '.join(F_DIVERGENCES)})")


# exp(-log u) overflows float32 past 88: bound the log-ratio the exponential members see. Only a
# sample whose implicit reward is beyond +-80 f_beta hits it (its gradient is then 0, where the
# unbounded loss would be inf); DPO's own h never gets there in practice.
_MAX_LOG_RATIO = 80.0


def fdpo_logit(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, divergence: str = "reverse_kl", f_beta: float = 1.0, alpha: float = 0.5) -> Tensor:
    """The f-DPO logit f_beta * (f'(u_w) - f'(u_l)) on Diffusion-DPO's likelihood-ratio estimate.

    Wang et al.'s f-DPO (section 4) replaces DPO's logit beta*(log u_w - log u_l) by
    beta*(f'(u_w) - f'(u_l)), u = pi_theta(x|c) / pi_ref(x|c) and f' from ``_f_prime``. Diffusion
    models have no exact log u; Diffusion-DPO's estimate of the implicit reward of one image
    (Wallace et al. 2023, eq. 14, per image) is r_i = f_beta * log u_i = -0.5 * beta * (err_i - ref_i).
    ``beta`` is Diffusion-DPO's (same value, same meaning); ``f_beta`` is f-DPO's own beta, which
    splits r_i into f_beta * log u_i. For the reverse KL the split cancels and the logit is DPO's h
    exactly (computed through ``dpo_logit``); for the other members it sets how far into the
    nonlinearity of f' a given reward reaches. A diffpo choice, since no diffusion reference
    code exists for f-DPO: f_beta = 1 reads r_i as log u_i directly.
    ``alpha`` is the alpha-divergence's parameter, in (0, 1): alpha -> 0 approaches the reverse
    KL, alpha = 1 gives the forward KL's logit exactly.
    """
    if divergence == "reverse_kl":
        return dpo_logit(err_w, err_l, ref_w, ref_l, beta)
    log_u_w = (-0.5 * beta * (err_w - ref_w) / f_beta).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    log_u_l = (-0.5 * beta * (err_l - ref_l) / f_beta).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return f_beta * (_f_prime(log_u_w, divergence, alpha) - _f_prime(log_u_l, divergence, alpha))


def fdpo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float = 5000.0,
    divergence: str = "reverse_kl",
    f_beta: float = 1.0,
    alpha: float = 0.5,
) -> Tensor:
    """f-DPO (Wang et al. 2023) on Diffusion-DPO's errors: loss = -log sigmoid(f_beta * (f'(u_w) - f'(u_l))).

    ``divergence``: reverse_kl (== diffusion_dpo at the same beta, exactly), forward_kl, js
    (Jensen-Shannon) or alpha (alpha-divergence, parameter ``alpha``). See ``fdpo_logit`` for how
    u is read from the errors. Note the naming: these are divergences of the *regulariser*
    D_f(pi_theta || pi_ref), the paper's sense, where DPO is the reverse KL; DMPO's "reverse KL" is
    between the model and the preference-optimal policy, another axis (LOSSES.md).
    """
    return -F.logsigmoid(fdpo_logit(err_w, err_l, ref_w, ref_l, beta, divergence, f_beta, alpha))


# ----------------------------------------------------------------------------------------------
# Diffusion-KTO: unpaired feedback
# ----------------------------------------------------------------------------------------------


def kto_loss(
    err: Tensor,
    ref: Tensor,
    desirable: Tensor,
    beta: float = 1000.0,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> Tensor:
    """Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility") on
    N single images with a desirable (True) / undesirable (False) label; returns (N,).

        g     = -(err - ref)                       the log-likelihood ratio estimate, per image
        z_ref = max(0, mean(g)), no gradient       the reference point (the paper's KL estimate)
        loss  = lambda_y * (1 - sigmoid(y * beta * (g - z_ref)))     y = +1 desirable, -1 not

    Follows jacklishufan/diffusion-kto train_kto_sd_v1.5.py (``--loss kto --halo sigmoid``: g_term,
    ``kl = g_term.mean().clamp(min=0).detach()``, ``# eq 8``; beta 1000 and lambda_d = lambda_u = 1
    are its defaults). Departure: the reference code averages z_ref over every process's batch; this
    pure function averages over the images it is given (the local batch).
    """
    desirable = desirable.to(dtype=torch.bool, device=err.device)
    weight = torch.where(desirable, lambda_desirable, lambda_undesirable).to(err.dtype)
    return weight * (1.0 - torch.sigmoid(kto_logit(err, ref, desirable, beta)))


def kto_logit(err: Tensor, ref: Tensor, desirable: Tensor, beta: float) -> Tensor:
    """y * beta * (g - z_ref) per image (``kto_loss``'s sigmoid argument), z_ref without gradient."""
    g = -(err - ref)
    reference_point = g.mean().clamp(min=0).detach()
    sign = torch.where(desirable.to(dtype=torch.bool, device=g.device), 1.0, -1.0).to(g.dtype)
    return sign * beta * (g - reference_point)


def _kto_rows(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, desirable_w: Tensor, desirable_l: Tensor, **hparams) -> Tensor:
    """The trainer feeds unpaired examples two per row (``LossSpec.examples``): the row's loss is
    the mean of its two images' losses, so the batch mean is the mean over all 2B images, and
    z_ref is taken over all of them."""
    per_image = kto_loss(torch.cat([err_w, err_l]), torch.cat([ref_w, ref_l]), torch.cat([desirable_w, desirable_l]), **hparams)
    return per_image.view(2, -1).mean(0)


def kto_margin(err_w, err_l, ref_w, ref_l, desirable_w, desirable_l, *, beta: float, **hparams) -> Tensor:
    """``kto_logit`` of every image of the rows: > 0 when the model moved the image the way its
    label asks (the reference code logs the fraction > 0 as ``acc``)."""
    return kto_logit(torch.cat([err_w, err_l]), torch.cat([ref_w, ref_l]), torch.cat([desirable_w, desirable_l]), beta)


# ----------------------------------------------------------------------------------------------
# Margins: each objective's own preference logit, logged as ``margin`` (> 0: the model prefers
# x_w) and ``implicit_accuracy`` (the fraction of pairs with margin > 0, LOSSES.md). A spec names
# its margin; extra hparams are ignored.
# ----------------------------------------------------------------------------------------------


def error_gap_margin(err_w: Tensor, err_l: Tensor, ref_w=None, ref_l=None, **hparams) -> Tensor:
    """err_l - err_w: the likelihood gap itself (reference-free losses without a logit of their own)."""
    return err_l - err_w


def dpo_margin(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, **hparams) -> Tensor:
    """DPO's implicit reward margin h (``dpo_logit``): needs the reference errors and ``beta``."""
    return dpo_logit(err_w, err_l, ref_w, ref_l, beta)


def mapo_margin(err_w: Tensor, err_l: Tensor, ref_w=None, ref_l=None, *, snr_value: float, num_train_timesteps: int, **hparams) -> Tensor:
    """MaPO's margin T * (s(err_w) - s(err_l)), the argument of its log-sigmoid (``mapo_loss``)."""
    return num_train_timesteps * (mapo_score(err_w, snr_value) - mapo_score(err_l, snr_value))


def fdpo_margin(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float, divergence: str, f_beta: float, alpha: float, **hparams) -> Tensor:
    """f-DPO's logit (``fdpo_logit``); DPO's h for the reverse KL."""
    return fdpo_logit(err_w, err_l, ref_w, ref_l, beta, divergence, f_beta, alpha)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The allowed values of a string hparam (f-DPO's ``divergence``), for ``LossSpec.ranges``."""

    values: tuple[str, ...]

    def __init__(self, *values: str):
        object.__setattr__(self, "values", tuple(values))


def format_range(bounds: tuple | Choice) -> str:
    """``(0, None, "exclusive")`` -> ``(0, inf)``; ``(1, None, "inclusive")`` -> ``[1, inf)``;
    ``Choice("a", "b")`` -> ``{a, b}``."""
    if isinstance(bounds, Choice):
        return "{" + ", ".join(bounds.values) + "}"
    low, high, kind = bounds
    open_ = kind == "exclusive"
    left = "(" if open_ or low is None else "["
    right = ")" if open_ or high is None else "]"
    return f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"


def _in_range(value: float | str, bounds: tuple | Choice) -> bool:
    if isinstance(bounds, Choice):
        return value in bounds.values
    if isinstance(value, str):
        return False
    low, high, kind = bounds
    if not math.isfinite(value):
        return False
    if kind == "exclusive":
        return (low is None or value > low) and (high is None or value < high)
    return (low is None or value >= low) and (high is None or value <= high)


@dataclass(frozen=True)
class LossSpec:
    """One registered objective and what it needs from the trainer, declared, so that the trainer
    has no branch on a loss's name: the reference model's errors (``needs_reference``), which
    prompt conditions the loser (``loser_prompt``), and the margin it logs (``margin``)."""

    name: str
    fn: Callable[..., Tensor]
    needs_reference: bool
    hparams: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    ranges: Mapping[str, tuple] = field(default_factory=dict)
    """Allowed values of each hparam: ``(low, high, "exclusive" | "inclusive")``, None for no
    bound, or a ``Choice`` of strings; ``register`` requires one per hparam, and values outside (or
    non-finite) are refused."""
    loser_prompt: str = "pair"
    """Which prompt conditions the loser half: ``pair`` (the pair's prompt: a preference
    p(x_w > x_l | c) needs one c) or ``rejected`` (the pair's own ``rejected_prompt``, e.g.
    DreamBooth's class prompt; pairs without one are an error)."""
    margin: Callable[..., Tensor] = error_gap_margin
    """The preference logit logged as ``margin``: ``margin(err_w, err_l, ref_w, ref_l, **hparams)``
    (``dpo_margin``, ``mapo_margin``, or the default ``error_gap_margin``)."""
    examples: str = "pairs"
    """``pairs`` (a preferred and a dispreferred image of one prompt) or ``unpaired`` (single
    images, each labelled desirable or not: Diffusion-KTO). The trainer feeds unpaired examples
    two per row, each on its own prompt (so ``loser_prompt`` must be ``rejected``), and passes
    their labels as ``desirable_w`` / ``desirable_l`` (bool, shape (B,)) to the loss and margin."""

    def __post_init__(self) -> None:
        if self.loser_prompt not in ("pair", "rejected"):
            raise ValueError(f"loss '{self.name}': loser_prompt must be 'pair' or 'rejected', got {self.loser_prompt!r}")
        if self.examples not in ("pairs", "unpaired"):
            raise ValueError(f"loss '{self.name}': examples must be 'pairs' or 'unpaired', got {self.examples!r}")
        if self.examples == "unpaired" and self.loser_prompt != "rejected":
            raise ValueError(f"loss '{self.name}': unpaired examples each carry their own prompt, so loser_prompt must be 'rejected'")
        if set(self.ranges) - set(self.hparams):
            raise ValueError(f"loss '{self.name}': ranges for unknown hparams {sorted(set(self.ranges) - set(self.hparams))}")
        for key, bounds in self.ranges.items():
            if not isinstance(bounds, Choice) and bounds[2] not in ("exclusive", "inclusive") or not _in_range(self.hparams[key], bounds):
                raise ValueError(f"loss '{self.name}': default {key}={self.hparams[key]} is outside its range {bounds}")

    def resolve_hparams(self, hparams: Mapping[str, float] | None = None) -> dict[str, float]:
        """Defaults overridden by ``hparams``; an unknown name is an error naming the valid ones."""
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            valid = ", ".join(self.hparams) or "none"
            raise ValueError(f"loss '{self.name}' has no hparam {', '.join(map(repr, unknown))} (valid: {valid})")
        for key, value in hparams.items():
            bounds = self.ranges.get(key)
            if isinstance(value, str) != isinstance(self.hparams[key], str):  # "big" for beta, 3 for divergence
                expected = f"one of {format_range(bounds)}" if isinstance(bounds, Choice) else "a number"
                raise ValueError(f"loss.{key}: must be {expected}, got {value!r}")
            if bounds is not None and not _in_range(value if isinstance(value, str) else float(value), bounds):
                shown = value if isinstance(value, str) else f"{value:g}"
                raise ValueError(f"loss.{key}={shown}: outside the range of '{self.name}' {key}, {format_range(bounds)}")
        return {**self.hparams, **hparams}

    def _check_reference(self, ref_w: Tensor | None, ref_l: Tensor | None) -> None:
        if self.needs_reference and (ref_w is None or ref_l is None):
            raise ValueError(f"loss '{self.name}' needs the reference errors ref_w and ref_l")

    def _labels(self, desirable_w: Tensor | None, desirable_l: Tensor | None) -> dict[str, Tensor]:
        if self.examples == "pairs":
            return {}
        if desirable_w is None or desirable_l is None:
            raise ValueError(f"loss '{self.name}' learns from unpaired examples: it needs their labels desirable_w and desirable_l")
        return {"desirable_w": desirable_w, "desirable_l": desirable_l}

    def __call__(
        self, err_w: Tensor, err_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None,
        desirable_w: Tensor | None = None, desirable_l: Tensor | None = None, **hparams,
    ) -> Tensor:
        """Per-row loss, shape (B,): one pair, or two unpaired examples (``examples``)."""
        self._check_reference(ref_w, ref_l)
        resolved = self.resolve_hparams(hparams)
        labels = self._labels(desirable_w, desirable_l)
        if self.needs_reference:
            return self.fn(err_w, err_l, ref_w, ref_l, **labels, **resolved)
        return self.fn(err_w, err_l, **labels, **resolved)

    @torch.no_grad()
    def metrics(
        self, err_w: Tensor, err_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None,
        desirable_w: Tensor | None = None, desirable_l: Tensor | None = None, **hparams,
    ) -> dict[str, float]:
        """Logging metrics shared by every objective, so no loss needs its own logging code.

        ``margin`` is the objective's own preference logit, the spec's ``margin`` function: DPO's h
        for diffusion_dpo and dmpo, MaPO's T*(s(err_w) - s(err_l)) for mapo, err_l - err_w by
        default. Implicit accuracy is the fraction of pairs with margin > 0 (LOSSES.md).
        """
        resolved = self.resolve_hparams(hparams)
        err_w, err_l = err_w.detach().float(), err_l.detach().float()
        out = {"err_w": err_w.mean().item(), "err_l": err_l.mean().item()}
        if ref_w is not None and ref_l is not None:
            ref_w, ref_l = ref_w.detach().float(), ref_l.detach().float()
            out.update(ref_w=ref_w.mean().item(), ref_l=ref_l.mean().item())
        self._check_reference(ref_w, ref_l)
        margin = self.margin(err_w, err_l, ref_w, ref_l, **self._labels(desirable_w, desirable_l), **resolved)
        out.update(margin=margin.mean().item(), implicit_accuracy=(margin > 0).float().mean().item())
        return out


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add an objective to the registry; names are unique, and every hparam declares its range."""
    if spec.name in LOSSES:
        raise ValueError(f"loss '{spec.name}' is already registered")
    if set(spec.ranges) != set(spec.hparams):
        raise ValueError(f"loss '{spec.name}': declare a range for every hparam ({', '.join(sorted(set(spec.hparams) - set(spec.ranges)))} missing)")
    LOSSES[spec.name] = spec
    return spec


def unregister(name: str) -> LossSpec:
    """Remove an objective from the registry (a test's or a notebook's own loss); returns its spec."""
    return LOSSES.pop(name)


def get_loss(name: str) -> LossSpec:
    """Look up an objective by name with an error that lists the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}' (valid: {', '.join(LOSSES)})") from None


register(LossSpec("sft", sft_loss, needs_reference=False, description="supervised fine-tuning on the preferred image (err_w)"))
register(
    LossSpec(
        "diffusion_dpo",
        diffusion_dpo_loss,
        needs_reference=True,
        hparams={"beta": 5000.0},
        # beta scales the margin h (eq. 14); beta <= 0 flips or removes the preference.
        ranges={"beta": (0, None, "exclusive")},
        margin=dpo_margin,
        description="Diffusion-DPO (Wallace et al. 2023): -log sigmoid of the reference-relative margin",
    )
)
register(
    LossSpec(
        "dreambooth",
        dreambooth_loss,
        needs_reference=False,
        hparams={"prior_weight": 1.0},
        ranges={"prior_weight": (0, None, "inclusive")},  # 0: no prior preservation; < 0 would push the class prior away
        description="DreamBooth (Ruiz et al. 2023): err_w + prior_weight * err_l, the loser on its rejected_prompt (class prior)",
        loser_prompt="rejected",
    )
)
register(
    LossSpec(
        "mapo",
        mapo_loss,
        needs_reference=False,
        hparams={"beta": 0.1, "snr_value": 0.5, "num_train_timesteps": 1000},
        # beta = 0 is plain SFT (an ablation); beta < 0 would reward the rejected image. s(m) needs
        # a > 0 to be decreasing, and T scales a margin, so it must be positive too.
        ranges={"beta": (0, None, "inclusive"), "snr_value": (0, None, "exclusive"), "num_train_timesteps": (0, None, "exclusive")},
        margin=mapo_margin,
        description="MaPO (Hong et al. 2024): err_w plus a reference-free margin on bounded scores",
    )
)
register(
    LossSpec(
        "dmpo",
        dmpo_loss,
        needs_reference=True,
        hparams={"beta": 5000.0, "alpha": math.log(999.0)},
        # alpha is the target margin: sigmoid(alpha) > 1/2 only for alpha > 0 (the chosen image wins).
        ranges={"beta": (0, None, "exclusive"), "alpha": (0, None, "exclusive")},
        margin=dpo_margin,
        description="DMPO (Li et al. 2025), our reading: reverse KL(sigmoid(h) || sigmoid(alpha))",
    )
)
register(
    LossSpec(
        "fdpo",
        fdpo_loss,
        needs_reference=True,
        hparams={"beta": 5000.0, "divergence": "reverse_kl", "f_beta": 1.0, "alpha": 0.5},
        # beta as Diffusion-DPO's; f_beta > 0 is f-DPO's regularisation strength; the
        # alpha-divergence is the paper's, alpha in (0, 1) (its limits: 1 the forward KL's
        # logit, 0 the reverse KL's; both are members of their own).
        ranges={
            "beta": (0, None, "exclusive"),
            "divergence": Choice(*F_DIVERGENCES),
            "f_beta": (0, None, "exclusive"),
            "alpha": (0, 1, "exclusive"),
        },
        margin=fdpo_margin,
        description="f-DPO (Wang et al. 2023) on Diffusion-DPO: -log sigmoid(f_beta (f'(u_w) - f'(u_l))); reverse_kl == diffusion_dpo",
    )
)
register(
    LossSpec(
        "kto",
        _kto_rows,
        needs_reference=True,
        hparams={"beta": 1000.0, "lambda_desirable": 1.0, "lambda_undesirable": 1.0},
        ranges={"beta": (0, None, "exclusive"), "lambda_desirable": (0, None, "inclusive"), "lambda_undesirable": (0, None, "inclusive")},
        margin=kto_margin,
        loser_prompt="rejected",
        examples="unpaired",
        description="Diffusion-KTO (Li et al. 2024): unpaired desirable/undesirable images, sigmoid utility around a KL reference point",
    )
)
