"""Serving image files from a folder without ever leaving it.

A URL path is attacker-controlled text: ``..`` segments, percent-encoded slashes, absolute paths
and symlinks can all point outside the folder the user named. Every request is resolved to a
real path (symlinks followed) and must lie inside the resolved folder; otherwise 403. Only image
files are served (404 for anything else), so even a file inside the folder such as a caption or
a manifest is not handed out by this route.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}


def inside(root: Path, relative: str) -> Path:
    """The real path of ``root/relative``; HTTP 403 if it escapes ``root``, 404 if no image is there."""
    root = root.resolve()
    if "\x00" in relative:
        raise HTTPException(403, "bad path")
    target = (root / relative).resolve()  # an absolute `relative` replaces root: caught below
    if not target.is_relative_to(root):
        raise HTTPException(403, "outside the served folder")
    if target.suffix.lower() not in IMAGE_TYPES or not target.is_file():
        raise HTTPException(404, "no such image")
    return target


def image_response(root: Path, relative: str) -> FileResponse:
    target = inside(root, relative)
    # Images never change under a label/view session, but a relabelled folder might: no caching.
    return FileResponse(target, media_type=IMAGE_TYPES[target.suffix.lower()], headers={"Cache-Control": "no-store"})
