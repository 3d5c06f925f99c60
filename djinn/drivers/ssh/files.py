"""SFTP: files placed into the workspace and artifacts collected from it.

The workspace (cwd of every job; base of relative object, key and artifact
paths) is the remote user's home directory, as upstream, or the driver map's
`workspace` (absolute, or relative to the home), created if missing.

Artifacts are resolved on the server (SFTP realpath) and refused when any
symlink along the path leads out of the workspace.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import posixpath
import stat
from typing import Any, BinaryIO, Callable, Iterator, cast

import paramiko

from djinn.drivers.ssh.connect import Connection
from djinn.errors import DriverError
from djinn.paths import PathEscapeError

#: Output read size, and the SFTP request size.
CHUNK = 32768
#: Artifacts are downloaded in pipelined windows of this many bytes (bounded memory).
WINDOW = 4 << 20
#: Bound on SFTP replies.
SFTP_TIMEOUT = 60.0


class Files:
    """The build's SFTP session over the connection's transport, and the workspace it works in."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.sftp: paramiko.SFTPClient | None = None
        self.home: str | None = None
        self.workspace: str | None = None
        self._real_workspace: str | None = None  # the workspace with symlinks resolved on the server

    def open(self, workspace: str) -> None:
        """Open SFTP and find the workspace (the driver map's `workspace`, "" for the home), making it if missing."""
        transport = self.connection.require()
        try:
            self.sftp = paramiko.SFTPClient.from_transport(transport)
        except (EOFError, paramiko.SSHException) as exc:
            raise DriverError(
                f"{self.connection.address} offers no SFTP ({exc or type(exc).__name__}): the server's sshd_config "
                "needs a Subsystem sftp line, e.g. 'Subsystem sftp internal-sftp'"
            ) from None
        self.sftp.get_channel().settimeout(SFTP_TIMEOUT)
        transport.channel_timeout = SFTP_TIMEOUT  # bounds open_session when no timeout is given
        self.home = self.sftp.normalize(".")
        self.workspace = posixpath.normpath(posixpath.join(self.home, workspace)) if workspace else self.home
        self.makedirs(self.workspace, 0o755)
        self._real_workspace = self.sftp.normalize(self.workspace)

    def path(self, path: str) -> str:
        """`path` relative to the workspace (or absolute) as an absolute path."""
        assert self.workspace is not None
        return posixpath.normpath(posixpath.join(self.workspace, path))

    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        """Copy data to dest (relative to the workspace, or absolute), making parent directories.

        The remote machine is the build's own, so absolute paths are allowed (keys go to ~/.ssh).
        Parents are created 0700 for a private file (a key), else 0755.
        """
        target = self.path(dest)
        try:
            self.makedirs(posixpath.dirname(target), 0o755 if mode & 0o077 else 0o700)
            self.write(target, data, mode)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self.connection.failure(f"placing {dest} at {target}", exc) from None

    def write(self, path: str, data: BinaryIO, mode: int) -> None:
        assert self.sftp is not None
        with self.sftp.open(path, "wb") as remote:
            remote.chmod(mode)  # before any byte is written: keys are never readable by others
            remote.set_pipelined(True)
            while chunk := data.read(CHUNK * 8):
                remote.write(chunk)

    def makedirs(self, path: str, mode: int) -> None:
        assert self.sftp is not None
        missing = []
        while path not in ("/", ""):
            try:
                st = self.sftp.stat(path)
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
                continue
            if not stat.S_ISDIR(st.st_mode or 0):
                raise DriverError(f"{path} exists on {self.connection.address} and is not a directory")
            break
        for directory in reversed(missing):
            self.sftp.mkdir(directory, mode)

    def remove(self, *paths: str) -> None:
        """Remove files, ignoring failures (and everything once SFTP is closed)."""
        if self.sftp is None:
            return
        for path in paths:
            try:
                self.sftp.remove(path)
            except (OSError, EOFError, paramiko.SSHException):
                pass

    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        """(path, stream) per regular file matching source; `*` in source globs, as SPEC section 4."""
        assert self.sftp is not None and self.workspace is not None
        try:
            pattern = self.path(source)
            matches = self._glob(pattern) if "*" in source else [pattern]
            for match in matches:
                try:
                    real = self.sftp.normalize(match)
                    st = self.sftp.stat(real)
                except FileNotFoundError:
                    continue
                inside = self._real_workspace or self.workspace
                if real != inside and not real.startswith(inside.rstrip("/") + "/"):
                    raise PathEscapeError(f"artifact source {source!r} leads outside the workspace ({real}); not collected")
                if not stat.S_ISREG(st.st_mode or 0):
                    continue
                # Opened by the path as listed (checked above); the job that could swap links is over.
                with self.sftp.open(match, "rb") as remote:
                    shown = match.removeprefix(self.workspace.rstrip("/") + "/")
                    failure = functools.partial(self.connection.failure, f"reading {shown}")
                    yield shown, cast(BinaryIO, _SFTPReader(remote, st.st_size or 0, failure))  # read() is all callers use
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self.connection.failure(f"collecting {source}", exc) from None

    def close(self) -> None:
        """Close SFTP, once."""
        with self.connection.lock:
            sftp, self.sftp = self.sftp, None
        if sftp is not None:
            sftp.close()

    def _glob(self, pattern: str) -> list[str]:
        """Component-wise glob over SFTP; like glob.glob, `*` does not match a leading dot."""
        assert self.sftp is not None
        found = ["/"]
        for part in [p for p in pattern.split("/") if p]:
            nxt = []
            for base in found:
                if not any(c in part for c in "*?["):
                    nxt.append(posixpath.join(base, part))
                    continue
                try:
                    names = self.sftp.listdir(base)
                except OSError:
                    continue
                nxt += [
                    posixpath.join(base, n)
                    for n in sorted(names)
                    if fnmatch.fnmatchcase(n, part) and (part.startswith(".") or not n.startswith("."))
                ]
            found = nxt
        return found


class _SFTPReader(io.RawIOBase):
    """A remote file read in pipelined windows: fast over slow links, at most WINDOW bytes in memory."""

    def __init__(self, remote: paramiko.SFTPFile, size: int, failure: Callable[[BaseException], DriverError]) -> None:
        self._chunks = self._generate(remote, size)
        self._pending = b""
        self._failure = failure

    @staticmethod
    def _generate(remote: paramiko.SFTPFile, size: int) -> Iterator[bytes]:
        offset = 0
        while offset < size:
            end = min(offset + WINDOW, size)
            requests = [(o, min(CHUNK, end - o)) for o in range(offset, end, CHUNK)]
            for data in remote.readv(requests):
                if not data:
                    return
                yield data
            offset = end
        # The file may have grown since it was listed: read the rest plainly.
        remote.seek(offset)
        while data := remote.read(CHUNK):
            yield data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            try:
                self._pending = next(self._chunks, b"")
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise self._failure(exc) from None
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
