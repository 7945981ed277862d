"""The shapes world as a diffpo plugin: ``register()`` adds it to the core's registries.

Named by the entry point ``[project.entry-points."diffpo.plugins"] shapes =
"diffpo.toy.plugin:register"`` (and by ``diffpo.plugins.BUILTIN_PLUGINS``), it is what a
third-party package would write; the core names nothing in ``diffpo.toy``. It registers

* the model id ``toy:base`` -> the committed base model (``diffpo/assets/toy_base``);
* the DDIM loop that samples ``sd``-family models without a VAE (``diffpo.toy.sampling``);
* the programmatic scorers ``shapes_*`` (``diffpo.toy.scorers``);
* the prompt sets ``shapes-heldout`` and ``shapes-all`` (``diffpo eval --prompts``);
* the subcommands ``diffpo demo`` and ``diffpo toy ...`` (``diffpo.toy.cli``).

Registering is cheap: the model, the sampler and the commands load their heavy parts on use.
Calling ``register()`` again replaces the entries with equal ones.
"""

from __future__ import annotations

from pathlib import Path

from diffpo.toy.grammar import all_prompts, split_prompts

MODELS = ("base",)
"""``toy:<name>`` ids: the committed base model only."""


def resolve_model(name: str, cache_dir: Path) -> str:
    """``toy:base`` -> the folder of the committed base model (``cache_dir`` is unused: nothing is built)."""
    from diffpo.models import ModelLoadError
    from diffpo.toy.base import ASSET_DIR

    if name not in MODELS:
        raise ModelLoadError(f"unknown shapes-world model 'toy:{name}' (valid: {', '.join('toy:' + m for m in MODELS)})")
    return str(ASSET_DIR)


def shapes_heldout() -> list[str]:
    """The prompts held out from training (``split_prompts`` of ``all_prompts()``, seed 0): they
    test composition rather than memorisation."""
    return [p.text for p in split_prompts(all_prompts(), heldout_fraction=0.2, seed=0)[1]]


def shapes_all() -> list[str]:
    return [p.text for p in all_prompts()]


def register_cli(sub) -> None:
    """``diffpo demo`` and ``diffpo toy ...``; imported when the parser is built, since their options
    (``DemoSettings``) pull in the trainer."""
    from diffpo.toy import cli

    cli.register_cli(sub)


def register() -> None:
    from diffpo.cli import register_command
    from diffpo.evaluate.prompts import register_prompt_set
    from diffpo.family import PixelSampler, register_pixel_sampler
    from diffpo.models import register_model_resolver
    from diffpo.toy.sampling import PIXEL_SAMPLING, build_sampler
    from diffpo.toy.scorers import register_shapes_scorers

    register_model_resolver("toy", resolve_model, overwrite=True)
    register_pixel_sampler("sd", PixelSampler(build=build_sampler, defaults=PIXEL_SAMPLING, schedulers=("ddim",)), overwrite=True)
    register_shapes_scorers()
    register_prompt_set("shapes-heldout", shapes_heldout, overwrite=True)
    register_prompt_set("shapes-all", shapes_all, overwrite=True)
    register_command(register_cli)
