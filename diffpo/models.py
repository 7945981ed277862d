"""Loading diffusers models, LoRA through peft, the reference model, and saving results.

The family protocol (``Components``, ``Family``, ``FAMILIES``) lives in ``diffpo.family`` and is
re-exported here; the families are the modules of ``diffpo.families``, each registered in
``FAMILIES``. This file resolves model ids (``prefix:name`` ids go to the resolver registered for
the prefix: ``tiny:`` here, ``toy:`` by the shapes-world plugin; anything else is a hub id or a
folder) and the family (``model.family: auto`` asks the registry which family declares the
folder's pipeline class), and loads the components.

Reference model (LOSSES.md): with LoRA it is the same network with adapters disabled; with full
fine-tuning it is a frozen copy. Reference-free objectives never build or run it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import diffpo.families  # noqa: F401  (registers the built-in families)
from diffpo.config import LoraConfig, ModelConfig
from diffpo.families.sd import StableDiffusionFamily  # noqa: F401  (re-exported)
from diffpo.family import (  # noqa: F401  (re-exported: the public names of the model layer)
    FAMILIES,
    Components,
    Family,
    ModelLoadError,
    PixelSampler,
    _has_component,
    _read_model_index,
    family_for_pipeline,
    register_family,
    register_pixel_sampler,
    unregister_family,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Resolving and loading
# ----------------------------------------------------------------------------------------------


def _load_plugins() -> None:
    from diffpo.plugins import load_plugins

    load_plugins()


def detect_family(path: str) -> str:
    """The family whose ``detect_pipeline_classes`` names the folder's pipeline class (plugins
    are loaded when no built-in family does)."""
    index = _read_model_index(path) or {}
    pipeline = index.get("_class_name", "")
    family = family_for_pipeline(pipeline)
    if family is None:
        _load_plugins()
        family = family_for_pipeline(pipeline)
    if family is None:
        raise ModelLoadError(f"'{path}': cannot tell the model family from pipeline class '{pipeline}'; set model.family") from None
    return family


ModelResolver = Callable[[str, Path], str]
"""``resolver(name, cache_dir) -> local folder or hub id`` for model ids ``prefix:name``."""

MODEL_RESOLVERS: dict[str, ModelResolver] = {}
_PREFIXED_ID = re.compile(r"^([a-z][a-z0-9_-]*):(.*)$")  # "tiny:sd"; not "C:/..." nor a hub id


def register_model_resolver(prefix: str, resolver: ModelResolver, *, overwrite: bool = False) -> None:
    """Make ``model.pretrained: <prefix>:<name>`` resolve through ``resolver(name, cache_dir)``."""
    if prefix in MODEL_RESOLVERS and not overwrite:
        raise ValueError(f"model prefix {prefix!r} is already registered; pass overwrite=True to replace it")
    MODEL_RESOLVERS[prefix] = resolver


def _tiny_resolver(name: str, cache_dir: Path) -> str:
    """``tiny:<name>``: build the tiny random model once into ``cache_dir/<name>`` (``diffpo.tiny``)."""
    from diffpo.tiny import build_tiny

    return str(build_tiny(name, cache_dir / name))


register_model_resolver("tiny", _tiny_resolver)


def resolve_pretrained(pretrained: str, cache_dir: Path | None = None) -> str:
    """``prefix:name`` with a registered prefix -> that resolver's folder (plugins are loaded when
    the prefix is unknown, e.g. ``toy:base`` -> the committed shapes-world model); anything else
    (hub id, folder) as is."""
    match = _PREFIXED_ID.match(pretrained)
    if match is None:
        return pretrained
    prefix, name = match.groups()
    if prefix not in MODEL_RESOLVERS:
        from diffpo.plugins import load_plugins

        load_plugins()
    if prefix not in MODEL_RESOLVERS:
        return pretrained
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "diffpo" / prefix)
    return MODEL_RESOLVERS[prefix](name, cache_dir)


def resolve_family(cfg: ModelConfig, cache_dir: Path | None = None) -> tuple[str, str]:
    """(local folder or hub id, family name) of ``cfg.pretrained``."""
    path = resolve_pretrained(cfg.pretrained, cache_dir)
    family_name = detect_family(path) if cfg.family == "auto" else cfg.family
    if family_name not in FAMILIES:
        _load_plugins()
    if family_name not in FAMILIES:
        raise ModelLoadError(f"unknown model family '{family_name}' (valid: {', '.join(FAMILIES)})")
    return path, family_name


def load_components(cfg: ModelConfig, cache_dir: Path | None = None, with_encoders: bool = True) -> Components:
    """``with_encoders=False`` loads only the network and scheduler: no VAE, no text encoders
    (training from a latent cache, ``diffpo.data.cache``)."""
    path, family_name = resolve_family(cfg, cache_dir)
    family = FAMILIES[family_name]()
    try:
        components = family.load(path, cfg, encoders=with_encoders)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load '{cfg.pretrained}' as family '{family_name}': {err}") from err
    for module in components.frozen_modules():
        module.requires_grad_(False).eval()
    return components


# ----------------------------------------------------------------------------------------------
# LoRA and the reference model
# ----------------------------------------------------------------------------------------------


def add_lora(network: nn.Module, cfg: LoraConfig) -> None:
    """Freeze the network and add trainable LoRA adapters through peft (diffusers' add_adapter)."""
    from peft import LoraConfig as PeftLoraConfig

    network.requires_grad_(False)
    network.add_adapter(
        PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian", target_modules=cfg.target_modules)
    )


class Reference:
    """Computes the frozen reference prediction: adapters off (LoRA) or a frozen copy (full)."""

    def __init__(self, network: nn.Module, use_lora: bool):
        self.use_lora = use_lora
        self.frozen = None if use_lora else copy.deepcopy(network).requires_grad_(False).eval()

    @contextlib.contextmanager
    def network(self, trained: nn.Module):
        if self.frozen is not None:
            yield self.frozen
            return
        trained.disable_adapters()
        try:
            yield trained
        finally:
            trained.enable_adapters()


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    return [p for p in network.parameters() if p.requires_grad]
