"""What ran, where: the machine, the device, library versions, the git commit and the command line,
recorded by every study in its results so that a number can be traced to the run that made it."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The exact command as typed: ``python -m <module> ARGS`` (quoted for a shell); ``argv``
    defaults to this process's arguments."""
    return " ".join(["python -m", module, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def git_commit() -> dict:
    """HEAD and whether the working tree had uncommitted changes (then HEAD alone is not what ran)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(device: str = "cpu") -> dict:
    """Platform, CPU count, the accelerator behind ``device`` and the versions that shape the numbers."""
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "numpy": _version("numpy"),
        "diffpo": _version("diffpo"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info
