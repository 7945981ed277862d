"""Preference-pair data: sources (manifests, datasets-library tables), validation, transforms."""

from diffpo.data.pairs import DataError, LoadReport, PairRecord, load_pair_records, write_manifest
from diffpo.data.dataset import PairDataset, collate_pairs

__all__ = ["DataError", "LoadReport", "PairRecord", "load_pair_records", "write_manifest", "PairDataset", "collate_pairs"]
