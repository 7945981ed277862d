"""Typed configuration: YAML files plus dotted command-line overrides, validated up front.

Every field documents itself; cross-field checks live in ``__post_init__`` (TRL style). An
unknown key or a bad value raises ``ConfigError`` naming the key before any model is loaded.
``Config`` is the training run's; every subcommand's options are such a dataclass too, read by
the same ``load_options`` (``diffpo.options`` makes their flags and ``--help``).

    cfg = load_config("configs/tiny.yaml", ["loss.name=dmpo", "train.max_steps=3"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from diffpo.losses import get_loss
from diffpo.runs import IDENTITY_KEYS, is_identity_key


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns."""


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 (PyYAML's default) also reads yes/no/on/off as
    booleans, so ``mixed_precision: no`` became False and failed; here it stays the string 'no'.
    Boolean fields still accept yes/no/on/off (``_coerce``)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_BOOL_WORDS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


def read_yaml(text: str) -> Any:
    """YAML as diffpo reads configs and overrides (``no``/``off`` stay strings, see ``_YamlLoader``)."""
    return yaml.load(text, Loader=_YamlLoader)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def flattened(factory: type) -> Any:
    """A nested dataclass field whose keys sit at its parent's level, in YAML, overrides and flags
    alike (a command's options around the training ``Config``: ``diffpo cache --out DIR train.seed=1``)."""
    return field(default_factory=factory, metadata={"flatten": True})


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters (peft) instead of the full network. The reference model is then the
    same network with adapters disabled, so no second copy is held in memory."""
    rank: int = 8
    """LoRA rank r: each adapted weight W gets W + (alpha / r) B A with A of r rows."""
    alpha: float = 8.0
    """LoRA scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Names (suffixes) of the modules that get adapters; the attention projections by default."""

    def __post_init__(self):
        _check(self.rank > 0, "model.lora.rank", f"must be positive, got {self.rank}")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "model.lora.target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    pretrained: str = "tiny:sd"
    """A hub id, a local diffusers folder, or ``tiny:<family>`` for a tiny random model built
    in-process (saved to a local folder and then loaded through the same path as a real id);
    plugins add other ``prefix:name`` ids (the shapes world: ``toy:base``)."""
    family: str = "auto"
    """Model family adapter: auto (read model_index.json), sd, sdxl, sd3 or flux."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``pretrained``; None: the default branch."""
    variant: str | None = None
    """Weight file variant to load, e.g. ``fp16``; None: the full-precision files."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool | list[str] = False
    """Recompute activations in the backward pass instead of keeping them: ``true`` for every block,
    or a list of module names to checkpoint only those blocks (``[down_blocks.1, up_blocks.1]``):
    less memory saved, less time spent (``diffpo.fastpath.set_gradient_checkpointing``)."""
    latent_sampling: Literal["sample", "mode"] = "sample"
    """How VAE latents are taken: a sample of the posterior (what the papers' code does) or its
    mode (deterministic; used by the latent cache equality check)."""

    def __post_init__(self):
        _check(bool(self.pretrained), "model.pretrained", "must not be empty")


@dataclass
class DataConfig:
    source: str = "data/tiny_pairs/pairs.jsonl"
    """A JSONL manifest (prompt, chosen, rejected), a folder holding pairs.jsonl, a local
    parquet/arrow/json file or folder, or a hub dataset id (Pick-a-Pic schema)."""
    format: str = "auto"
    """``auto`` (detected from the source), or a registered format (``diffpo.data.format``): ``manifest``,
    ``pickapic``, ``unpaired``, ``unpaired_table``, or one a plugin adds."""
    split: str = "train"
    """Split of a hub or local dataset (``datasets`` naming); manifests have none."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for other schemas, e.g. {caption: prompt, image_0: img_a, image_1: img_b,
    label_0: pref_a}. Keys: caption, image_0, image_1, label_0 (Pick-a-Pic names by default)."""
    ties: Literal["drop", "random"] = "drop"
    """Pairs labelled 0.5: drop them (the papers' default), or order them at random (seeded)."""
    resolution: int = 32
    """Square training side in pixels: images are resized (shorter side) and cropped to it."""
    center_crop: bool = False
    """Crop the centre of each image; false: a random crop (the same crop for both images of a pair)."""
    random_flip: bool = True
    """Mirror both images of a pair together with probability 1/2."""
    strict: bool = False
    """Stop before training on the first bad row instead of skipping it with a warning."""
    unpaired: bool = False
    """Split each preference pair into two unpaired examples (the chosen image desirable, the
    rejected one not) for objectives that learn from single labelled images (``loss.name: kto``).
    Sources in an unpaired format (``unpaired``, ``unpaired_table``) need no flag."""
    max_pairs: int | None = None
    """Use only the first N pairs; None: all of them."""
    num_workers: int = 0
    """DataLoader worker processes, kept across epochs; 0 loads in the training process."""
    cache: str | None = None
    """A latent cache folder written by ``diffpo cache`` (VAE latents and text embeddings of these
    pairs). Training then reads it instead of encoding, and never loads the VAE or text encoders;
    the cache must have been built with this model, resolution, crop and latent sampling."""

    def __post_init__(self):
        _check(self.resolution >= 8, "data.resolution", f"must be >= 8, got {self.resolution}")
        _check(self.cache is None or bool(self.cache.strip()), "data.cache", "must be a folder or null")
        _check(self.max_pairs is None or self.max_pairs > 0, "data.max_pairs", "must be positive")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        from diffpo.data.format import format_names, is_known_format  # here: diffpo.data imports this module

        _check(is_known_format(self.format), "data.format", f"unknown format {self.format!r} (known: {', '.join(format_names())})")


@dataclass
class LossConfig:
    name: str = "mapo"
    """One of ``diffpo losses``. Every other key in this section is the objective's hparam, e.g.
    ``loss.beta=0.2``; unknown hparams are an error."""
    hparams: dict[str, float | str] = field(default_factory=dict)
    """The objective's hyper-parameters (defaults and ranges: ``diffpo losses``); in YAML and overrides
    they sit beside ``name`` (``loss.beta=0.2``). Numbers, or a choice (fdpo's ``divergence``)."""

    def __post_init__(self):
        try:
            spec = get_loss(self.name)
            spec.resolve_hparams(self.hparams)
        except ValueError as err:  # the message names the key (loss.beta=-1: ...) or the loss
            raise ConfigError(str(err) if str(err).startswith("loss.") else f"loss: {err}") from None


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Pairs per process per micro-step (each pair is two images)."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step: the global batch is batch_size x this x processes."""
    max_steps: int = 100
    """Optimizer steps."""
    learning_rate: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    """Learning-rate schedule (``diffusers.optimization.get_scheduler``)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to the learning rate."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay."""
    adam_weight_decay: float = 1e-2
    """AdamW's decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon (added to the second moment's square root)."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (its two moments in 8 bits instead of float32; needs bitsandbytes).
    With ``weight_dtype=bf16`` it steps the float32 masters (``diffpo.fastpath.MasterWeightAdamW8bit``)."""
    adam_8bit_min_size: int = 4096
    """With ``use_8bit_adam``: tensors with fewer elements keep float32 moments (bitsandbytes'
    ``min_8bit_size``, whose default this is). Raising it quantizes only the largest tensors: less
    memory saved, and less of the 8-bit kernel's time, which on SDXL costs ~45 ms per step more
    than 32-bit AdamW (BENCHMARKS.md, issue 16)."""
    adam_8bit_kernel: Literal["bitsandbytes", "triton", "diffpo"] = "bitsandbytes"
    """With ``use_8bit_adam`` over bf16 weights: the kernel that updates the 8-bit moments. All three
    keep bitsandbytes' state layout (a checkpoint resumes under any of them) and its update rule.
    ``bitsandbytes``: its own for the device (its CUDA kernel on NVIDIA GPUs: 72 ms of each SDXL step
    on an H200, where the memory traffic alone would take ~10 ms); ``diffpo``: diffpo's
    (``diffpo.adam8bit``): a Triton kernel on CUDA GPUs (the same update in torch ops through
    torch.compile elsewhere), each moment rounded to its nearest code through two table lookups,
    the clipping scale inside the update; ``triton``: bitsandbytes' Triton kernel (written for
    Intel GPUs; needs Triton, which CUDA builds of torch ship), which takes the gradient scale as a
    compile-time constant, so clipping then runs as a pass of its own; Triton compiles it anew at
    steps 1, 2 and 16 (integer arguments equal to 1 or divisible by 16 are specialized). Speeds:
    BENCHMARKS.md, issue 16."""
    max_grad_norm: float | None = 1.0
    """Clip the gradients' global norm to this; null: no clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the forward passes (accelerate); fp16 also scales the loss."""
    weight_dtype: Literal["float32", "bf16"] = "float32"
    """``bf16``: the trained network computes with bf16 weights and the optimizer keeps their float32
    master copy (``diffpo.fastpath.MasterWeightAdamW``; faster and smaller than autocast over float32
    weights, no update lost); with ``use_8bit_adam`` the masters are stepped by 8-bit AdamW
    (``MasterWeightAdamW8bit``: 6 bytes less per parameter). Needs ``mixed_precision=bf16``; single
    GPU or DDP (FSDP/DeepSpeed keep their own float32 shards)."""
    compile: Literal["none", "regional", "full"] = "none"
    """torch.compile of the trained network: ``regional`` compiles each repeated block (seconds),
    ``full`` the whole network (minutes). Same results, faster steps on GPUs."""
    compile_options: dict[str, Any] = field(default_factory=dict)
    """Inductor options for that compilation (``torch.compile(options=...)``, names as in
    ``torch._inductor.config``; nested mappings are dotted names), e.g. ``{max_pointwise_cat_inputs: 1}``;
    they apply to the backward graphs too. Empty: PyTorch's defaults. Ignored with ``compile: none``."""
    compile_dynamic: bool | None = None
    """torch.compile's ``dynamic``: null, PyTorch's default (a block met at a second shape is
    recompiled with symbolic sizes, one graph for all its shapes); false: one static graph per shape
    (sizes known to every kernel; more graphs to compile, each new batch size compiles again);
    true: symbolic from the start. Ignored with ``compile: none``."""
    fused_geglu: bool = False
    """Swap diffusers' ``GEGLU`` activations (the feed-forwards of SD/SDXL's transformer blocks) for
    ``diffpo.geglu.FusedGEGLU``: the same weights and forward, a backward that writes the projection's
    gradient in one pass (a Triton kernel on CUDA) instead of inductor's concatenation kernel: 416 ->
    405 ms per SDXL step on an H200 (BENCHMARKS.md, issue 16). Networks without GEGLU (SD3, Flux) are
    left as they are."""
    compile_cache_dir: str | None = None
    """Where torch.compile keeps its caches (``~`` expands), so that a later run's first step skips
    compilation; null: PyTorch's default, ``/tmp/torchinductor_$USER``, lost on reboot
    (``diffpo.fastpath.use_compile_cache``)."""
    channels_last: bool = False
    """channels_last memory format for the trained network (convolutions on tensor cores)."""
    cudnn_benchmark: bool = False
    """``torch.backends.cudnn.benchmark`` for the run: cuDNN times its convolution algorithms on each
    new shape and keeps the fastest (the resolution is fixed, so once, in the first step). The
    chosen algorithms can differ between processes, so a resumed GPU run then matches an
    uninterrupted one only to rounding; off by default (PyTorch's reproducibility advice)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint-N/ folder every N optimizer steps."""
    checkpoints_total_limit: int | None = 3
    """Keep only the newest N checkpoint folders; null: keep all."""
    resume: str | None = None
    """``latest`` (newest complete checkpoint in output_dir), a checkpoint folder, or null."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Keys of the run's identity (``diffpo.runs.IDENTITY_KEYS``: objective and hparams, seed, data,
    model, LoRA shape, global batch, optimizer and lr schedule) that may differ from the resumed
    checkpoint's, e.g. ``[train.learning_rate]``; any other change refuses the resume. The new values
    apply from the resumed step on."""
    max_nonfinite_in_row: int = 5
    """Non-finite losses skip the step; this many in a row stop the run."""
    gc_every: int = 0
    """Python's garbage collector: 0 leaves it automatic; N > 0 turns its automatic collections off for
    the run and collects the young generations every N optimizer steps instead, all of them every 10 N
    (as torchtitan's ``training.gc_freq``), so that no collection pauses the host in the middle of a
    step while the device waits for its next kernels (``diffpo.train.GarbageCollection``; the fast SDXL
    config: 50). Results do not depend on it."""

    def __post_init__(self):
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "max_nonfinite_in_row"):
            value = getattr(self, key)
            _check(value > 0, f"train.{key}", f"must be positive, got {value}")
        _check(self.gc_every >= 0, "train.gc_every", f"must be >= 0 (0: automatic collection), got {self.gc_every}")
        _check(self.learning_rate > 0, "train.learning_rate", f"must be positive, got {self.learning_rate}")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0, "train.checkpoints_total_limit", "must be positive or null")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", "must be positive or null")
        _check(self.adam_8bit_min_size > 0, "train.adam_8bit_min_size", f"must be positive, got {self.adam_8bit_min_size}")
        for key in self.resume_allow_changes:
            _check(is_identity_key(key), "train.resume_allow_changes", f"{key!r} is not a key of the run identity (those are: {', '.join(IDENTITY_KEYS)}, loss.<hparam>)")
        if self.weight_dtype == "bf16":
            _check(self.mixed_precision == "bf16", "train.weight_dtype", f"bf16 weights need train.mixed_precision=bf16, got {self.mixed_precision!r}")
        if self.adam_8bit_kernel != "bitsandbytes":
            _check(self.use_8bit_adam and self.weight_dtype == "bf16", "train.adam_8bit_kernel", f"{self.adam_8bit_kernel!r} steps the float32 masters of bf16 weights: needs train.use_8bit_adam=true and train.weight_dtype=bf16")


@dataclass
class LoggingConfig:
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Tracker for the metrics (besides OUTPUT_DIR/metrics.jsonl, always written)."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    progress: bool = True
    """Show a progress bar."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts sampled every ``validation_every`` steps (and at the end) with fixed seeds; the grid
    goes to OUTPUT_DIR/samples/step-N.png and to tensorboard/wandb."""
    validation_every: int = 0
    """0 turns validation sampling off."""
    validation_images_per_prompt: int = 2
    """Images per validation prompt (seeds 0..N-1)."""
    validation_inference_steps: int | None = None
    """None: the family's default (``Family.sampling_default_settings``; 25 for the shapes world)."""
    validation_guidance_scale: float | None = None
    """None: the family's default (3.0 for the shapes world)."""
    validation_resolution: int | None = None
    """Square side in pixels; None: the model's default resolution."""

    def __post_init__(self):
        _check(self.log_every > 0, "logging.log_every", "must be positive")
        _check(self.validation_every >= 0, "logging.validation_every", "must be >= 0 (0 = off)")
        _check(self.validation_images_per_prompt > 0, "logging.validation_images_per_prompt", "must be positive")
        _check(not (self.validation_every and not self.validation_prompts), "logging.validation_prompts", "needed when validation_every > 0")


@dataclass
class Config:
    output_dir: str = "runs/default"
    """The run's folder: metrics.jsonl, checkpoint-N/, final/ and the resolved config."""
    overwrite_output_dir: bool = False
    """A fresh run into an output_dir that holds another run is refused; true moves that run to
    ``OUTPUT_DIR.old-<time>`` first (never deletes it)."""
    seed: int = 0
    """Seed of every random draw (data order, noise, timesteps, flips)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        # An empty output_dir would write metrics, checkpoints and final/ into the current folder.
        _check(bool(self.output_dir.strip()), "output_dir", "must not be empty (name the run's folder)")
        # The latent cache holds one text embedding per pair: nothing for a separate loser prompt.
        _check(
            not (self.data.cache and get_loss(self.loss.name).loser_prompt == "rejected"), "data.cache",
            f"loss '{self.loss.name}' conditions the rejected image on its own prompt, which the latent cache does not store; train it without data.cache",
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["loss"] = {"name": self.loss.name, **self.loss.hparams}
        return out


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key.
# ----------------------------------------------------------------------------------------------


def takes_text(annotation: Any) -> bool:
    """A field typed str, Path or a Literal of strings (or None besides): command-line text is its
    value as written, not parsed as YAML (``--out 2024`` is the folder '2024', not a number)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return any(takes_text(arg) for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        return all(isinstance(arg, str) for arg in get_args(annotation))
    return annotation in (str, Path)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        _check(value in args, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return _build(annotation, value, key)
    if origin is list:
        if isinstance(value, str):  # a comma-separated list on the command line: --scorers a,b
            value = [part if takes_text(args[0]) else read_yaml(part) for part in map(str.strip, value.split(",")) if part]
        _check(isinstance(value, list), key, f"must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            value = _BOOL_WORDS[value.lower()]
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if annotation is Path:
        _check(isinstance(value, (str, Path)) and str(value) != "", key, f"must be a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    if cls is LossConfig:
        # Every key besides name is an hparam of the objective: loss.beta=0.2.
        data = dict(data)
        kwargs["name"] = _coerce(data.pop("name", LossConfig.name), str, "loss.name")
        hparams = data.pop("hparams", {}) or {}
        hparams.update(data)
        kwargs["hparams"] = {k: _coerce(v, float | str, f"loss.{k}") for k, v in hparams.items()}  # numbers, or a choice (fdpo's divergence)
        return cls(**kwargs)
    data = dict(data)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flatten"):  # its keys sit at this level: hand them down
            own = _keys(hints[f.name])
            kwargs[f.name] = _build(hints[f.name], {k: data.pop(k) for k in list(data) if k in own}, prefix)
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names or key in kwargs:
            raise ConfigError(f"{dotted}: unknown key (valid keys here: {', '.join(sorted(_keys(cls)))})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{f'{prefix}.{f.name}' if prefix else f.name}: required, and not given")
    return cls(**kwargs)


def _keys(cls: type) -> set[str]:
    """The keys a mapping for ``cls`` may hold: its fields, a flattened field's own keys in its place."""
    hints = typing.get_type_hints(cls)
    return {k for f in dataclasses.fields(cls) for k in (_keys(hints[f.name]) if f.metadata.get("flatten") else {f.name})}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=3", "loss.name=dmpo"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _check(bool(key.strip()), item, "empty key")
        try:
            value = read_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"{key.strip()}: not a YAML value: {raw!r}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def load_options(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, flags: dict[str, Any] | None = None) -> Any:
    """A ``cls`` from its defaults, then a YAML file (optional), then dotted overrides, then
    ``flags`` (a nested dict, as ``diffpo.options`` reads them from the command line); validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = _merge(_merge(data, parse_overrides(overrides or [])), flags or {})
    return _build(cls, data, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (optional), apply dotted overrides, validate, return ``Config``."""
    return load_options(Config, path, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
