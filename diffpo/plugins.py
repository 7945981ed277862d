"""Plugins: packages that add model resolvers, data formats, model families, scorers, prompt sets,
pixel-space samplers and CLI commands to diffpo through the core's registries.

A plugin is a function ``register()`` named by an entry point of the group ``diffpo.plugins``::

    # the plugin's pyproject.toml
    [project.entry-points."diffpo.plugins"]
    shapes = "diffpo.toy.plugin:register"

``register()`` calls the registries it needs: ``diffpo.models.register_model_resolver``
(``prefix:name`` model ids), ``diffpo.data.format.register_format`` (``data.format``),
``diffpo.family.register_family`` (model families), ``diffpo.family.register_pixel_sampler``,
``diffpo.evaluate.scorers.register_scorer``, ``diffpo.evaluate.prompts.register_prompt_set``
and ``diffpo.cli.register_command``. The registries call ``load_plugins()`` when asked for a
name they do not hold (``resolve_pretrained("toy:base")``, scorer ``shapes_color``, prompt set
``shapes-heldout``, a ``data.format``, a model family or ``tiny:`` id), and the CLI calls it
before it builds its parser, so importing the core loads no plugin and a plugin is only imported
when one of its names is used.

The shapes world (``diffpo.toy``) is such a plugin. Its entry point is in diffpo's own
pyproject.toml, but an editable install reads entry points from the metadata written at install
time, so a checkout whose metadata predates the entry point would not see it: ``BUILTIN_PLUGINS``
names it once more, and the loader takes the union of both lists (each target once).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

GROUP = "diffpo.plugins"
BUILTIN_PLUGINS: tuple[str, ...] = ("diffpo.toy.plugin:register",)
"""Plugins shipped inside the diffpo package, loaded even when the installed metadata lacks their
entry point (see the module docstring). Skipped without a word when the module is not installed."""

_loaded: list[str] | None = None
PLUGIN_ERRORS: dict[str, str] = {}
"""target -> why it failed to load; a broken third-party plugin must not break the core."""


def plugin_targets() -> list[str]:
    """``module:function`` of every plugin: the entry points of ``GROUP``, then the built-ins."""
    found = [ep.value.replace(" ", "") for ep in entry_points(group=GROUP)]
    return list(dict.fromkeys([*found, *BUILTIN_PLUGINS]))


def _resolve(target: str) -> Callable[[], None] | None:
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if target in BUILTIN_PLUGINS and err.name is not None and module_name.startswith(err.name):
            return None  # a built-in plugin left out of this installation
        raise
    register = module
    for part in (attribute or "register").split("."):
        register = getattr(register, part)
    return register


def load_plugins() -> list[str]:
    """Call every plugin's ``register()`` once (later calls return at once); the targets loaded.

    The list is set before the first ``register()`` runs, so a registry that misses a name while
    a plugin registers does not start loading again."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = []
    for target in plugin_targets():
        try:
            register = _resolve(target)
            if register is None:
                continue
            register()
        except Exception as err:  # noqa: BLE001 - reported, and the other plugins still load
            PLUGIN_ERRORS[target] = f"{type(err).__name__}: {err}"
            logger.warning("diffpo plugin %s failed to load: %s", target, PLUGIN_ERRORS[target])
            continue
        _loaded.append(target)
    return _loaded
