"""Keeping file paths from a manifest inside the directory they are meant for."""

from __future__ import annotations

import os
from pathlib import Path

from djinn.errors import DjinnError


class PathEscapeError(DjinnError):
    """A manifest path points outside the directory it must stay in."""


def resolve_inside(root: str | Path, path: str, what: str = "path") -> Path:
    """`root/path` with symlinks resolved, refused when it leaves `root`."""
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / path.lstrip("/"))) if not os.path.isabs(path) else Path(os.path.realpath(path))
    if target != base and base not in target.parents:
        raise PathEscapeError(f"{what} {path!r} leaves the build directory; use a path inside it")
    return target


def plain_file_name(name: str, what: str = "name") -> str:
    """`name` when it can be used as one file name as it is (no '/', not '.' or '..', no NUL); else PathEscapeError."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name.encode("utf-8", "surrogateescape")) > 255:
        raise PathEscapeError(f"{what} {name!r} must be a plain file name (no '/', not '.' or '..', at most 255 bytes)")
    return name
