"""The data-format protocol: ``DataFormat``, the raw rows a format yields, and the ``FORMATS`` registry.

A *format* turns ``data.source`` into raw rows; ``diffpo.data.pairs.load_pair_records`` validates
them, orders ties and builds ``PairRecord``s, so a format only parses. Each built-in format is one
module of ``diffpo.data.formats`` (``manifest``, ``pickapic``); another one is a file with a reader
and ``register_format(DataFormat(...))``, from a plugin (``diffpo.plugins``) or any module::

    def read_csv(cfg):          # cfg: diffpo.config.DataConfig
        for i, line in enumerate(...):
            yield RawPair(row=i, prompt=..., image_0=..., image_1=..., label_0=1.0)

    register_format(DataFormat("csv", read_csv, description="prompt,chosen,rejected paths"))

then ``data.format: csv``. ``DataConfig`` checks the name against this registry (``data.format``
names the known ones), so a typo stops before any model loads.

A format declares the kind of rows it yields (``DataFormat.rows``): ``pairs`` (``RawPair``, what
every objective of ``diffpo.losses`` trains on today), or ``unpaired``: single images with a
desirable/undesirable label (``RawExample``: Diffusion-KTO's feedback; ``diffpo.data.formats.unpaired``).
``load_pair_records`` packs unpaired examples two per row for objectives that learn from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

if TYPE_CHECKING:
    from diffpo.config import DataConfig


class DataError(ValueError):
    """Bad preference data; the message names the file/source, the row and the problem."""


RowKind = Literal["pairs", "unpaired"]


@dataclass(frozen=True)
class RawPair:
    """One row of a pair format, before validation. Images are a path or encoded bytes (or
    anything ``load_pair_records`` will reject with a reason: None, an unreadable path)."""

    row: int
    """The row's index in the source, named in every warning and error about it."""
    prompt: Any
    image_0: Any
    image_1: Any
    label_0: Any = 1.0
    """1: image 0 is preferred, 0: image 1 is, 0.5: a tie (Pick-a-Pic's convention)."""
    rejected_prompt: Any = None
    """The prompt the rejected image was generated from, when not ``prompt`` (manifest key)."""
    problem: str | None = None
    """Set when the row could not even be parsed (bad JSON): it is skipped with this reason."""


@dataclass(frozen=True)
class RawExample:
    """One row of an unpaired format (``DataFormat.rows == "unpaired"``): a single image with a
    desirable / undesirable label (thumbs up or down), before validation."""

    row: int
    prompt: Any
    image: Any
    desirable: Any
    """True / False (also 1 / 0, or the strings "true" / "false"); anything else is a bad row."""
    problem: str | None = None


@dataclass(frozen=True)
class DataFormat:
    """A source format: its name (``data.format``), its reader, and what kind of rows it yields."""

    name: str
    read: Callable[["DataConfig"], Iterable[Any]]
    """``read(data_config)`` -> rows (``RawPair`` for ``rows="pairs"``, ``RawExample`` for
    ``rows="unpaired"``), lazily; a source that
    cannot be read at all raises ``DataError`` naming it."""
    rows: RowKind = "pairs"
    detect: Callable[[str], bool] | None = None
    """``detect(source)`` -> True when ``data.format: auto`` should read ``source`` with this format
    (cheap: look at the path and at most the first line). Formats without it are only used by name."""
    description: str = ""


FORMATS: dict[str, DataFormat] = {}

AUTO = "auto"
FALLBACK = "pickapic"
"""What ``data.format: auto`` reads a source no format claims as: a datasets-library table (a hub
id cannot be looked into without downloading it)."""


def register_format(spec: DataFormat, *, overwrite: bool = False) -> DataFormat:
    if spec.name == AUTO:
        raise ValueError(f"'{AUTO}' is not a format name: it asks to detect the format")
    if spec.name in FORMATS and not overwrite:
        raise ValueError(f"data format {spec.name!r} is already registered; pass overwrite=True to replace it")
    if spec.rows not in ("pairs", "unpaired"):
        raise ValueError(f"data format {spec.name!r}: rows must be 'pairs' or 'unpaired', got {spec.rows!r}")
    FORMATS[spec.name] = spec
    return spec


def unregister_format(name: str) -> None:
    FORMATS.pop(name, None)


def _ensure_registered(name: str | None = None) -> None:
    """Register the built-in formats, and the plugins' when ``name`` is still unknown."""
    import diffpo.data.formats  # noqa: F401  (each built-in module registers itself)

    if name is not None and name != AUTO and name not in FORMATS:
        from diffpo.plugins import load_plugins

        load_plugins()


def format_names() -> list[str]:
    """The names ``data.format`` accepts: ``auto`` and every registered format."""
    _ensure_registered()
    return [AUTO, *FORMATS]


def is_known_format(name: str) -> bool:
    """Whether ``data.format: name`` names something (``auto`` or a format; plugins load on a miss)."""
    _ensure_registered(name)
    return name == AUTO or name in FORMATS


def get_format(name: str) -> DataFormat:
    _ensure_registered(name)
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"data.format: unknown format '{name}' (known: {', '.join(format_names())})") from None


def detect_format(source: str) -> DataFormat:
    """The format ``data.format: auto`` reads ``source`` with: the first registered format whose
    ``detect`` claims it, else ``FALLBACK``."""
    _ensure_registered()
    for spec in FORMATS.values():
        if spec.detect is not None and spec.detect(source):
            return spec
    return get_format(FALLBACK)


def resolve_format(cfg: "DataConfig") -> DataFormat:
    return detect_format(cfg.source) if cfg.format == AUTO else get_format(cfg.format)

