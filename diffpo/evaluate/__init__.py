"""Evaluation of fine-tuned text-to-image models: reward-model scorers and paired statistics.

Importing this package loads no reward-model library; each scorer imports what it needs
when ``load_scorer`` builds it.
"""

from diffpo.evaluate.scorers import SCORERS, Scorer, load_scorer, register_scorer, scorer_names
from diffpo.evaluate.stats import bootstrap_ci, summarize, win_rate

__all__ = [
    "SCORERS",
    "Scorer",
    "bootstrap_ci",
    "load_scorer",
    "register_scorer",
    "scorer_names",
    "summarize",
    "win_rate",
]
