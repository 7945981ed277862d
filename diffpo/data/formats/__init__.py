"""The built-in data formats, one module each; importing this package registers them.

``manifest`` (diffpo's own JSONL pairs), ``pickapic`` (datasets-library tables in the Pick-a-Pic
schema), ``unpaired`` and ``unpaired_table`` (single images with a desirable label, Diffusion-KTO). The protocol and registry are in ``diffpo.data.format``; CONTRIBUTING.md says how to add one.
"""

# Auto-detection tries them in this order; the two manifests' detections never claim the same file
# (a pair row has chosen/rejected, an unpaired row image/desirable).
from diffpo.data.formats import manifest, pickapic, unpaired  # noqa: F401
