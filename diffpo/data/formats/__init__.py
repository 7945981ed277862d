"""The built-in data formats, one module each; importing this package registers them.

``manifest`` (diffpo's own JSONL pairs) and ``pickapic`` (datasets-library tables in the Pick-a-Pic
schema). The protocol and registry are in ``diffpo.data.format``; CONTRIBUTING.md says how to add one.
"""

from diffpo.data.formats import manifest, pickapic  # noqa: F401  (order: auto-detection tries manifest first)
