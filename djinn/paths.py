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
