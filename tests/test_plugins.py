"""Plugins (``diffpo.plugins``): a package registers model ids, scorers, prompt sets, pixel-space
samplers and subcommands through an entry point, exactly as the shapes world does.

Every test starts from empty registries with no plugin loaded (the ``registries`` fixture), so
what the core finds is what the plugins under test registered.
"""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from torch import nn

import diffpo.cli as cli_module
import diffpo.evaluate.prompts as prompts_module
import diffpo.evaluate.scorers as scorers_module
import diffpo.family as family_module
import diffpo.models as models_module
import diffpo.plugins as plugins
from diffpo.cli import main
from diffpo.evaluate.prompts import load_prompts, prompt_set_names
from diffpo.evaluate.run import EvalError
from diffpo.evaluate.scorers import load_scorer, scorer_names
from diffpo.models import Components, StableDiffusionFamily, resolve_pretrained

THIRD_PARTY = '''
"""A third-party diffpo plugin: one of each registration."""
from dataclasses import dataclass

CALLS = []


class Constant:
    name = "{name}_score"

    def score(self, images, prompts):
        return [0.5] * len(images)

    def describe(self):
        return {{"name": self.name, "model": None}}


@dataclass
class HelloOptions:
    who: str = "world"
    """Whom to greet."""


def cmd(options):
    print("hello from {name}", options.who)
    return 0


def register_cli(sub):
    from diffpo.options import add_command

    add_command(sub, "{name}-hello", HelloOptions, cmd, help="say hello")


def register():
    from diffpo.cli import register_command
    from diffpo.evaluate.prompts import register_prompt_set
    from diffpo.evaluate.scorers import register_scorer
    from diffpo.models import register_model_resolver

    CALLS.append(1)
    register_model_resolver("{name}", lambda name, cache_dir: f"/models/{{name}}")
    register_scorer("{name}_score", lambda **kw: Constant())
    register_prompt_set("{name}-set", lambda: ["a red circle", "a blue star"])
    register_command(register_cli)
'''


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch):
    """Empty registries (the core's own entries kept), no plugin loaded yet, no entry points."""
    monkeypatch.setattr(plugins, "_loaded", None)
    monkeypatch.setattr(plugins, "PLUGIN_ERRORS", {})
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    monkeypatch.setattr(models_module, "MODEL_RESOLVERS", {"tiny": models_module.MODEL_RESOLVERS["tiny"]})
    monkeypatch.setattr(family_module, "PIXEL_SAMPLERS", {})
    monkeypatch.setattr(scorers_module, "SCORERS", {k: v for k, v in scorers_module.SCORERS.items() if not k.startswith("shapes_")})
    monkeypatch.setattr(prompts_module, "PROMPT_SETS", {})
    monkeypatch.setattr(cli_module, "_EXTRA_COMMANDS", [])
    return monkeypatch


def install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, source: str = THIRD_PARTY) -> str:
    """Write module ``name`` into ``tmp_path`` and expose ``name:register`` as an entry point."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source.format(name=name)))
    monkeypatch.syspath_prepend(str(tmp_path))
    target = f"{name}:register"
    entries = [EntryPoint(name=name, value=target, group=plugins.GROUP)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: entries if group == plugins.GROUP else [])
    return target


def test_a_third_party_plugin_registers_through_its_entry_point(registries, tmp_path, capsys) -> None:
    install(registries, tmp_path, "acme")
    assert resolve_pretrained("acme:big") == "/models/big"  # an unknown prefix loads the plugins
    assert plugins.load_plugins() == ["acme:register", *plugins.BUILTIN_PLUGINS]  # entry points first, built-ins after
    assert load_prompts("acme-set") == ["a red circle", "a blue star"]
    assert load_scorer("acme_score").score([None, None], ["x", "y"]) == [0.5, 0.5]
    assert main(["acme-hello", "--who", "you"]) == 0
    assert capsys.readouterr().out == "hello from acme you\n"
    assert main(["acme-hello", "who=them"]) == 0  # a plugin's options take overrides (and --config) like the core's
    assert capsys.readouterr().out == "hello from acme them\n"
    with pytest.raises(SystemExit):
        main(["acme-hello", "--help"])
    assert "Whom to greet. (default: world)" in capsys.readouterr().out
    import acme

    assert acme.CALLS == [1]  # registered once, however many registries asked


def test_the_shapes_world_is_a_plugin_like_any_other(registries) -> None:
    """Nothing of the world is registered until a name of it is asked for; then all of it is."""
    assert "shapes_color" not in scorers_module.SCORERS and "toy" not in models_module.MODEL_RESOLVERS
    heldout = load_prompts("shapes-heldout")  # the same 11 of 54 prompts as before the plugin split
    assert len(heldout) == 11 and len(load_prompts("shapes-all")) == 54
    assert heldout[:2] == ["a red circle on a white background", "a green circle on a gray background"]
    assert resolve_pretrained("toy:base").endswith("assets/toy_base")
    assert {"shapes_color", "shapes_shape", "shapes_style"} <= set(scorer_names())
    assert "sd" in family_module.PIXEL_SAMPLERS
    with pytest.raises(models_module.ModelLoadError, match=r"unknown shapes-world model 'toy:large' \(valid: toy:base\)"):
        resolve_pretrained("toy:large")


def test_an_entry_point_and_a_builtin_naming_the_same_plugin_load_it_once(registries, tmp_path) -> None:
    target = install(registries, tmp_path, "twice")
    registries.setattr(plugins, "BUILTIN_PLUGINS", (target,))
    assert plugins.load_plugins() == [target]
    import twice

    assert twice.CALLS == [1]


def test_a_broken_plugin_is_reported_and_the_others_still_load(registries, tmp_path, caplog) -> None:
    install(registries, tmp_path, "broken", "def register():\n    raise RuntimeError('no licence file')\n")
    assert plugins.load_plugins() == list(plugins.BUILTIN_PLUGINS)
    assert plugins.PLUGIN_ERRORS == {"broken:register": "RuntimeError: no licence file"}
    assert "diffpo plugin broken:register failed to load: RuntimeError: no licence file" in caplog.text
    assert "shapes-all" in prompt_set_names()


def test_without_plugins_the_core_runs_on_its_own(registries, capsys) -> None:
    """No plugin at all: plugin ids pass through as hub ids (as any unknown id does), plugin names
    are unknown with the usual errors, and a model without a VAE has no sampler."""
    registries.setattr(plugins, "BUILTIN_PLUGINS", ())
    assert resolve_pretrained("toy:base") == "toy:base"
    assert resolve_pretrained("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(EvalError, match="prompt set 'shapes-all': no such file, and not a built-in set \\(built-in: none\\)"):
        load_prompts("shapes-all")
    with pytest.raises(ValueError, match="unknown scorer 'shapes_color'"):
        load_scorer("shapes_color")
    with pytest.raises(SystemExit):
        main(["--help"])
    commands = capsys.readouterr().out.split("{", 1)[1].split("}", 1)[0].split(",")
    assert "eval" in commands and "toy" not in commands and "demo" not in commands

    pixel_model = Components(StableDiffusionFamily(), nn.Identity(), None, [], [], vae=None, source="pixels")
    assert StableDiffusionFamily().sampling_defaults(pixel_model)["num_inference_steps"] == 30  # the latent defaults
    from diffpo.sampling import SamplingError

    with pytest.raises(SamplingError, match="family 'sd' samples latent models only, and 'pixels' has no VAE"):
        StableDiffusionFamily().sampler(pixel_model, pixel_model.network, None, "cpu")


def test_pixel_models_sample_with_the_plugin_settings(registries) -> None:
    """With the shapes world loaded, the ``sd`` family's models without a VAE take its calibrated
    DDIM settings and its loop; latent models keep the pipeline's."""
    pixel_model = Components(StableDiffusionFamily(), nn.Identity(), None, [], [], vae=None)
    assert StableDiffusionFamily().sampling_defaults(pixel_model) == {"num_inference_steps": 25, "guidance_scale": 3.0, "scheduler": "ddim", "clip_sample": True}
    assert StableDiffusionFamily().sampling_schedulers(pixel_model) == ("ddim",)
    latent_model = Components(StableDiffusionFamily(), nn.Identity(), None, [], [], vae=nn.Identity())
    assert StableDiffusionFamily().sampling_defaults(latent_model)["num_inference_steps"] == 30


def test_a_subclass_of_the_sd_family_samples_pixel_models_as_sd(registries) -> None:
    """The hook is found by family name along the class hierarchy, as the method it replaced was
    inherited."""

    class Variant(StableDiffusionFamily):
        name = "sd-variant"

    pixel_model = Components(Variant(), nn.Identity(), None, [], [], vae=None)
    assert Variant().sampling_defaults(pixel_model)["num_inference_steps"] == 25
