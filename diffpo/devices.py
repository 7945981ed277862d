"""One check for every ``--device`` flag: a device torch can use here, or one clear error line.

Without it, ``--device cuda`` on a CPU-only torch failed deep inside torch (``AssertionError:
Torch not compiled with CUDA enabled``) after the data and models had loaded. Every subcommand
whose options have a ``device`` runs it before it starts (``diffpo.options``; ``diffpo.cli.main``
for a plugin's hand-written parser).
"""

from __future__ import annotations

import torch

from diffpo.config import ConfigError


def resolve_device(text: str, flag: str = "--device") -> str:
    """``text`` if torch can place tensors there (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...), else ``ConfigError``."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag} {text!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu" or device.type == "meta":
        return text
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise ConfigError(f"{flag} {text}: torch {torch.__version__} has no usable {device.type} device here; use --device cpu or install a {device.type} build")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{flag} {text}: only {count} {device.type} device(s) visible (indices 0..{count - 1})")
    return text
