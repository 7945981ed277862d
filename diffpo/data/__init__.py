"""Preference data: formats (one module each in ``diffpo.data.formats``, registered in
``diffpo.data.format``), validation into ``PairRecord``s, transforms, and the latent cache
(``diffpo.data.cache``)."""

from diffpo.data.format import DataError, DataFormat, RawPair, format_names, get_format, register_format, unregister_format
from diffpo.data.pairs import LoadReport, PairRecord, load_pair_records, write_manifest
from diffpo.data.dataset import PairDataset, collate_pairs

__all__ = [
    "DataError", "DataFormat", "RawPair", "format_names", "get_format", "register_format", "unregister_format",
    "LoadReport", "PairRecord", "load_pair_records", "write_manifest", "PairDataset", "collate_pairs",
]
