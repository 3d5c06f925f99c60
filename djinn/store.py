"""Where objects come from and artifacts go: the runner sees only these two small protocols."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from djinn.errors import DjinnError
from djinn.paths import resolve_inside

CHUNK = 1 << 20


class StoreError(DjinnError):
    """An object could not be read or an artifact could not be written."""


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    size: int
    md5: str
    sha256: str
    truncated: bool = False


class ObjectStore(Protocol):
    def open(self, name: str) -> BinaryIO:
        """The object's bytes; StoreError when there is no such object."""


class ArtifactStore(Protocol):
    def store(self, job: str, name: str, data: BinaryIO) -> StoredArtifact:
        """Keep one artifact of `job` under `name`."""


def copy_hashed(data: BinaryIO, out: BinaryIO, limit: int = 0) -> StoredArtifact:
    """Copy at most `limit` bytes (0 = all), hashing on the way; the rest is read and dropped."""
    md5, sha256, size, truncated = hashlib.md5(), hashlib.sha256(), 0, False
    while chunk := data.read(CHUNK):
        if limit and size + len(chunk) > limit:
            chunk = chunk[: limit - size]
            truncated = True
        if chunk:
            md5.update(chunk)
            sha256.update(chunk)
            out.write(chunk)
            size += len(chunk)
        if truncated:
            break
    return StoredArtifact("", size, md5.hexdigest(), sha256.hexdigest(), truncated)


class DirectoryObjects:
    """Objects read from a plain directory (the offline runner's `-objects DIR`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def open(self, name: str) -> BinaryIO:
        path = resolve_inside(self.root, name, "object")
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise StoreError(f"object {name!r} not found in {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read object {name!r}: {exc.strerror}") from None


class DirectoryArtifacts:
    """Artifacts written as `<dir>/<name>` (the offline runner's `-artifacts DIR`)."""

    def __init__(self, root: str | Path, limit: int = 0) -> None:
        self.root = Path(root)
        self.limit = limit

    def store(self, job: str, name: str, data: BinaryIO) -> StoredArtifact:
        self.root.mkdir(parents=True, exist_ok=True)
        target = resolve_inside(self.root, name, "artifact name")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed, so a half-copied artifact is never seen.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".djinn-")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                stored = copy_hashed(data, out, self.limit)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        return StoredArtifact(name, stored.size, stored.md5, stored.sha256, stored.truncated)
