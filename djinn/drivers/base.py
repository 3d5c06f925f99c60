"""The one small interface every driver implements.

A driver owns one build's environment: it is created once, receives objects and
keys, runs job scripts one at a time, hands artifacts back and is destroyed. The
runner calls `cancel` from another thread to stop whatever is in progress.
"""

from __future__ import annotations

import abc
import builtins
import posixpath
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, ClassVar, Iterator, Mapping

from djinn.config.settings import override
from djinn.errors import ConfigError, DriverError

Output = Callable[[bytes], None]

# One argument to exec may be at most 128 KiB on Linux (MAX_ARG_STRLEN); keep clear of it.
MAX_INLINE_SCRIPT = 96 * 1024


def inline_script(script: bytes) -> str | None:
    """The script as the text of `sh -c`, when it fits one argument; None when it must go to a file.

    Handing the script over on the command line spares a file per job: its
    creation, and its removal, on the build's critical path.
    """
    if len(script) > MAX_INLINE_SCRIPT or b"\0" in script:
        return None
    try:
        return script.decode()
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class BuildIdentity:
    """The build a driver runs, and the worker running it: what its containers, directories and VMs are marked with.

    Empty when nobody says (the offline runner): a driver then makes up what it needs.
    """

    build_id: str = ""
    worker: str = ""


class Driver(abc.ABC):
    #: The manifest's `driver.type` this class serves.
    type: ClassVar[str]
    #: Everything this driver reads: its driver-config block's fields plus the manifest keys it takes.
    Settings: ClassVar[builtins.type[Any]]  # `type` is the name of the class variable above

    def __init__(self, values: Mapping[str, Any] | None = None, identity: BuildIdentity | None = None, *, configured: Any = None) -> None:
        self.settings = self.decode_settings(values, configured)
        self.identity = identity or BuildIdentity()

    @classmethod
    def decode_settings(cls, values: Mapping[str, Any] | None = None, configured: Any = None) -> Any:
        """The driver's typed settings: `configured` (its driver-config block) overridden by `values` (the manifest's map)."""
        try:
            return override(cls.Settings, configured, values or {})
        except ConfigError as exc:
            raise DriverError(f"{cls.type} driver: {exc}") from None

    @abc.abstractmethod
    def create(self, env: Mapping[str, str], log: Output) -> None:
        """Bring the environment up; `env` is the build's environment for every job."""

    @abc.abstractmethod
    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        """Copy `data` to `dest` (relative to the workspace, or absolute) before the first job."""

    @abc.abstractmethod
    def execute(self, name: str, script: bytes, output: Output) -> int:
        """Run one job script, streaming its output; returns the exit status."""

    def prepare(self, name: str, script: bytes) -> None:
        """A hint, given while the current job runs: job `name` with `script` is next.

        A driver may get ready for it in the background (docker creates its container);
        `execute` still runs whatever it is given. Never raises. Most drivers ignore it.
        """
        return None

    @abc.abstractmethod
    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        """Yield (path, stream) for each file matching `source` (relative to the workspace)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Make a running `create` or `execute` return promptly, and refuse new ones."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove everything the build made. Safe to call more than once."""

    @classmethod
    def settings_of(cls, given: Any) -> Any:
        """`given` as this driver's settings: a driver-config block, or a map of values over the defaults."""
        return cls.decode_settings(given) if isinstance(given, Mapping) else cls.decode_settings(None, given)

    @classmethod
    def check(cls, configured: Any) -> None:
        """Raise DriverError when this host cannot run builds with these settings (checked at start-up)."""
        return None  # most drivers have nothing to check

    def key_location(self, name: str) -> str:
        """Where a build key named `name` is placed."""
        return posixpath.join("/root/.ssh", name)
