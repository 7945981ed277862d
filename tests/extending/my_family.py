"""A model family in one file: Stable Diffusion under another name, with its own pipeline class (so
``model.family: auto`` tells its folders apart), its own tiny model ``tiny:renamed_sd``, and the
compile blocks it inherits. Registered by ``register_family(RenamedSDFamily)``.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from diffpo.families.sd import StableDiffusionFamily, build_tiny_sd


class RenamedSDPipeline(StableDiffusionPipeline):
    """The folder's ``model_index.json`` names this class, which only this family claims."""


def build_tiny_renamed_sd() -> RenamedSDPipeline:
    return RenamedSDPipeline(**build_tiny_sd().components, requires_safety_checker=False)


class RenamedSDFamily(StableDiffusionFamily):
    name = "renamed_sd"
    pipeline_class_name = "RenamedSDPipeline"
    detect_pipeline_classes = ("RenamedSDPipeline",)
    tiny_models = {"renamed_sd": build_tiny_renamed_sd}
    predictions = 0
    """Calls of ``predict``, so a test can see that training ran through this family."""

    @property
    def pipeline_class(self):
        return RenamedSDPipeline  # not an attribute of diffusers, where the base class looks

    def predict(self, components, network, noisy, timesteps, cond):
        type(self).predictions += 1
        return super().predict(components, network, noisy, timesteps, cond)
