"""Where objects come from and artifacts go: the runner sees only these two small protocols."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

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
    def store(self, job: Any, name: str, data: BinaryIO) -> StoredArtifact:
        """Keep one artifact of `job` (a plan.JobPlan) under `name`."""


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


def write_file(target: Path, data: BinaryIO, limit: int = 0) -> StoredArtifact:
    """Write `data` to `target` via a temporary file beside it, so a half copy is never seen."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".djinn-")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            stored = copy_hashed(data, out, limit)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return stored


class DirectoryArtifacts:
    """Artifacts written as `<dir>/<name>` (the offline runner's `-artifacts DIR`)."""

    def __init__(self, root: str | Path, limit: int = 0) -> None:
        self.root = Path(root)
        self.limit = limit

    def store(self, job: Any, name: str, data: BinaryIO) -> StoredArtifact:
        self.root.mkdir(parents=True, exist_ok=True)
        stored = write_file(resolve_inside(self.root, name, "artifact name"), data, self.limit)
        return StoredArtifact(name, stored.size, stored.md5, stored.sha256, stored.truncated)


class FileStore:
    """The worker's `store` blocks of type file: each file kept as `<path>/<user_id>/<hash>`."""

    def __init__(self, root: str | Path, limit: int = 0) -> None:
        self.root = Path(root)
        self.limit = limit

    def path(self, user_id: int, hash: str) -> Path:
        return resolve_inside(self.root, f"{int(user_id)}/{hash}", "stored file")

    def open(self, user_id: int, hash: str) -> BinaryIO:
        try:
            return open(self.path(user_id, hash), "rb")
        except FileNotFoundError:
            raise StoreError(f"{self.path(user_id, hash)} is missing from the store") from None

    def write(self, user_id: int, hash: str, data: BinaryIO) -> StoredArtifact:
        """Keep `data`, truncated to the store's limit (the documented upstream behaviour)."""
        return write_file(self.path(user_id, hash), data, self.limit)

    def remove(self, user_id: int, hash: str) -> None:
        self.path(user_id, hash).unlink(missing_ok=True)


class BuildObjects:
    """The runner's ObjectStore for one build: the objects its rows name, from the object store."""

    def __init__(self, files: FileStore, objects: dict[str, tuple[int, str]]) -> None:
        self.files = files
        self.objects = objects

    def open(self, name: str) -> BinaryIO:
        if name not in self.objects:
            raise StoreError(f"object {name!r} no longer exists")
        user_id, hash_ = self.objects[name]
        return self.files.open(user_id, hash_)
