"""The comparison protocol of issue 17, as data and pure functions (no training here).

1. Sweep: every objective runs at each value of its main knob (``KNOBS``) on the TRAINING seeds, in
   the sweep settings (one per task family: a style setting and a reward setting).
2. Select: ``select_knob`` picks one value per (objective, task family) from the sweep runs alone,
   by a rule fixed here before any evaluation-seed run exists (``SELECTION_RULE``).
3. Final: every objective runs at its chosen value on the separate EVALUATION seeds (>= 5) in every
   final setting; methods share the pairs of a (setting, seed), so they pair up seed by seed.

Adding an objective (issue 18's Diffusion-KTO, f-DPO members) = its label in ``--objectives`` plus
one row in ``KNOBS`` (a member of a registered family: a row with ``loss`` and ``fixed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from diffpo.toy.demo import DemoSettings


@dataclass(frozen=True)
class Knob:
    """The hparam swept for an objective: a loss hparam (``beta``) or the ``learning_rate``.

    A row may also name the registered loss it runs (``loss``, default: the row's own name) and
    hparams it fixes (``fixed``), so that members of one registered family run side by side under
    their own labels, e.g. ``"fdpo_js": Knob("beta", (...), loss="fdpo", fixed={"divergence": ...})``.
    """

    name: str
    values: tuple[float, ...]
    loss: str | None = None
    fixed: Mapping[str, float] = field(default_factory=dict)

    @property
    def is_learning_rate(self) -> bool:
        return self.name == "learning_rate"


SHARED_LEARNING_RATE = 5e-5
"""The lr of every objective whose knob is not the lr (the demo's default, chosen on the CPU for
MaPO's faithfulness: the same for all, so it favours none by being tuned for one)."""

KNOBS: dict[str, Knob] = {
    # SFT has no preference strength: its knob is how far it moves, the lr (half, 1x, 2x shared).
    "sft": Knob("learning_rate", (2.5e-5, 5e-5, 1e-4)),
    # Reference-based betas: the toy default 1000 (TOY_LOSS_HPARAMS) and a factor 4 either side;
    # DPO and DMPO share the values so that the margin diagnostic compares them at equal beta.
    "diffusion_dpo": Knob("beta", (250.0, 1000.0, 4000.0)),
    "dmpo": Knob("beta", (250.0, 1000.0, 4000.0)),
    # MaPO's beta weights its margin term against the likelihood term; the paper default 0.1 and
    # a factor 3 either side.
    "mapo": Knob("beta", (0.03, 0.1, 0.3)),
}

FAITHFULNESS_DROP_MAX = 0.05
"""The selection rule's constraint: mean faithfulness (checker colour + shape accuracy) may drop
by at most 5 points from the base over the training seeds."""

SELECTION_RULE = (
    f"per objective and task family, on the training seeds only: the knob value with the highest mean task-reward gain "
    f"(tuned - base) among those whose mean faithfulness drop is <= {FAITHFULNESS_DROP_MAX:g}; if none qualifies, "
    f"the value with the smallest mean faithfulness drop"
)


class ProtocolError(ValueError):
    """A study argument that cannot run: the message names the argument and the value."""


def knob_for(objective: str) -> Knob:
    try:
        return KNOBS[objective]
    except KeyError:
        raise ProtocolError(
            f"--objectives: '{objective}' has no knob in studies/protocol.py KNOBS (add one row: its swept hparam and values)"
        ) from None


def parse_setting(text: str, base: DemoSettings) -> DemoSettings:
    """``style:outline:1.0`` or ``reward:size[:label_noise]`` -> the experiment's settings."""
    from dataclasses import replace

    parts = text.split(":")
    try:
        if parts[0] == "style" and len(parts) == 3:
            return replace(base, task="style", style=parts[1], severity=float(parts[2]))
        if parts[0] == "reward" and len(parts) in (2, 3):
            return replace(base, task="reward", reward=parts[1], label_noise=float(parts[2]) if len(parts) == 3 else 0.0)
    except ValueError:
        pass
    raise ProtocolError(f"bad setting {text!r}: use style:STYLE:SEVERITY or reward:NAME[:LABEL_NOISE]")


def family(setting: str) -> str:
    """The task family whose sweep chooses a setting's knob: ``style:outline`` or ``reward:size``
    (a style's severity and a reward's label noise do not start a new family)."""
    return ":".join(setting.split(":")[:2])


def run_settings(settings: DemoSettings, objective: str, value: float) -> DemoSettings:
    """``settings`` for one run of ``objective`` at knob ``value``."""
    from dataclasses import replace

    knob = knob_for(objective)
    loss = knob.loss or objective
    if knob.is_learning_rate:
        return replace(settings, loss=loss, learning_rate=value, loss_hparams=dict(knob.fixed))
    return replace(settings, loss=loss, learning_rate=SHARED_LEARNING_RATE, loss_hparams={**knob.fixed, knob.name: value})


@dataclass(frozen=True)
class Run:
    """One training + evaluation run of the study; ``stage`` is ``sweep`` or ``final``."""

    stage: str
    setting: str
    seed: int
    objective: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.setting.replace(':', '_')}/seed{self.seed}/{self.objective}/{knob_for(self.objective).name}={self.value:g}"


def sweep_runs(objectives: Sequence[str], sweep_settings: Sequence[str], train_seeds: Sequence[int]) -> list[Run]:
    return [
        Run("sweep", setting, seed, objective, value)
        for setting in sweep_settings for seed in train_seeds for objective in objectives for value in knob_for(objective).values
    ]


def final_runs(objectives: Sequence[str], final_settings: Sequence[str], eval_seeds: Sequence[int], chosen: dict[str, dict[str, float]]) -> list[Run]:
    """``chosen[family][objective]`` -> the runs on the evaluation seeds."""
    return [
        Run("final", setting, seed, objective, chosen[family(setting)][objective])
        for setting in final_settings for seed in eval_seeds for objective in objectives
    ]


def check_plan(objectives: Sequence[str], sweep_settings: Sequence[str], final_settings: Sequence[str], train_seeds: Sequence[int], eval_seeds: Sequence[int], min_eval_seeds: int = 5) -> None:
    """Everything that makes a plan unsound, as one ProtocolError naming the argument."""
    for objective in objectives:
        knob_for(objective)
    overlap = sorted(set(train_seeds) & set(eval_seeds))
    if overlap:
        raise ProtocolError(f"--eval-seeds: seeds {overlap} are also training seeds; evaluation seeds must be separate")
    if len(eval_seeds) < min_eval_seeds:
        raise ProtocolError(f"--eval-seeds: {len(eval_seeds)} seeds, the protocol needs >= {min_eval_seeds} per cell (--min-eval-seeds to lower it for a smoke run)")
    swept = {family(s) for s in sweep_settings}
    missing = sorted({family(s) for s in final_settings} - swept)
    if missing:
        raise ProtocolError(f"--settings: no sweep setting chooses the knob of {missing} (add one to --sweep-settings)")
    for name, seeds in (("--train-seeds", train_seeds), ("--eval-seeds", eval_seeds)):
        if len(set(seeds)) != len(seeds):
            raise ProtocolError(f"{name}: a seed is repeated in {list(seeds)}")


def select_knob(sweep_reports: Sequence[dict], objective: str, drop_max: float = FAITHFULNESS_DROP_MAX) -> dict:
    """Apply ``SELECTION_RULE`` to one objective's sweep reports of one task family (each report:
    ``value``, ``reward_gain``, ``faithfulness_delta``). Returns the chosen value and the table
    it was chosen from (mean over the training seeds per value)."""
    by_value: dict[float, list[dict]] = {}
    for report in sweep_reports:
        by_value.setdefault(report["value"], []).append(report)
    if not by_value:
        raise ProtocolError(f"no finished sweep run of '{objective}': run the sweep stage first")
    table = [
        {
            "value": value,
            "reward_gain": sum(r["reward_gain"] for r in rows) / len(rows),
            "faithfulness_delta": sum(r["faithfulness_delta"] for r in rows) / len(rows),
            "seeds": sorted(r["seed"] for r in rows),
        }
        for value, rows in sorted(by_value.items())
    ]
    feasible = [row for row in table if row["faithfulness_delta"] >= -drop_max]
    if feasible:
        best, why = max(feasible, key=lambda row: row["reward_gain"]), "highest reward gain within the faithfulness limit"
    else:
        best, why = max(table, key=lambda row: row["faithfulness_delta"]), "no value within the faithfulness limit: the smallest drop"
    return {"objective": objective, "knob": knob_for(objective).name, "value": best["value"], "why": why, "table": table}
