"""The ssh driver: job scripts run on another machine over SSH (paramiko).

It is also the session layer of the qemu driver, which boots a VM and then
calls `connect` and `start` on its own address; everything after that
(`place`, `execute`, `collect`, `cancel`, `destroy`) works on whatever
connected transport the driver holds.

The driver is composed of three parts, each module importing only those before it:
- connect: reaching and logging in to the server (addresses, the key, the
  retrying login and its cancel), holding the authenticated transport;
- files: SFTP, and the workspace on the remote side (cwd of every job; base
  of relative object, key and artifact paths): placing files, collecting artifacts;
- session: the private directory on the remote side (environment wrapper, job
  scripts, pid files; removed by `destroy`), one exec channel per job, and
  killing a job's processes.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import paramiko

from djinn.config.settings import SSHSettings, setting
from djinn.drivers.base import BuildIdentity, Driver, Output
from djinn.drivers.ssh.connect import (
    ATTEMPT_TIMEOUT,
    AUTH_RETRY_PAUSE,
    DEFAULT_PORT,
    RETRY_PAUSE,
    Connection,
    format_address,
    load_key,
    parse_address,
)
from djinn.drivers.ssh.files import CHUNK, SFTP_TIMEOUT, WINDOW, Files
from djinn.drivers.ssh.session import CONTROL_TIMEOUT, DRAIN_SECONDS, KILLED, SETTLE_SECONDS, Session
from djinn.errors import DriverError

# Importers keep using djinn.drivers.ssh: the parts' constants and address helpers are re-exported here.
__all__ = [
    "ATTEMPT_TIMEOUT",
    "AUTH_RETRY_PAUSE",
    "CHUNK",
    "CONTROL_TIMEOUT",
    "DEFAULT_PORT",
    "DRAIN_SECONDS",
    "DRIVER",
    "KILLED",
    "RETRY_PAUSE",
    "SETTLE_SECONDS",
    "SFTP_TIMEOUT",
    "SSHDriver",
    "SSHRunSettings",
    "WINDOW",
    "format_address",
    "parse_address",
]


@dataclass(frozen=True)
class SSHRunSettings(SSHSettings):
    """What one build's ssh driver reads: the driver config's block plus the manifest's keys."""

    address: str = setting("")
    workspace: str = setting("")


class SSHDriver(Driver):
    """Runs jobs over one SSH connection: SFTP for files, one exec channel per job.

    Settings: `address` (host[:port], port 22 by default), `user` (root), `password`
    (None: not configured; "" is an empty password, tried with the `none` method
    first), `key` (path of a private key file), `timeout` (how long to keep trying
    to connect and log in), `workspace` (optional, see djinn.drivers.ssh.files).
    With neither password nor key the driver tries `none` and the empty password,
    as Djinn images allow.
    """

    type = "ssh"
    Settings = SSHRunSettings
    settings: SSHRunSettings

    def __init__(self, values: Mapping[str, Any] | None = None, identity: BuildIdentity | None = None, *, configured: Any = None) -> None:
        super().__init__(values, identity, configured=configured)
        s = self.settings
        self.connection = Connection(s.user, s.password, s.key, s.timeout.total_seconds())
        self.files = Files(self.connection)
        self.session = Session(self.connection, self.files)

    @classmethod
    def check(cls, configured: Any) -> None:
        """At worker start-up: a configured key is readable (the address comes per build)."""
        load_key(cls(configured=cls.settings_of(configured)).key_file)

    # The parts' state, under the names the qemu driver, the tests and the messages read.

    @property
    def user(self) -> str:
        return self.connection.user

    @property
    def password(self) -> str | None:
        return self.connection.password

    @property
    def key_file(self) -> str | None:
        return self.connection.key_file

    @property
    def timeout(self) -> float:
        return self.connection.timeout

    @property
    def address(self) -> str | None:
        """host:port, for messages."""
        return self.connection.address

    @property
    def transport(self) -> paramiko.Transport | None:
        return self.connection.transport

    @property
    def sftp(self) -> paramiko.SFTPClient | None:
        return self.files.sftp

    @property
    def home(self) -> str | None:
        return self.files.home

    @property
    def workspace(self) -> str | None:
        return self.files.workspace

    @property
    def private_dir(self) -> str | None:
        return self.session.private_dir

    # --- connecting ---------------------------------------------------------

    def create(self, env: Mapping[str, str], log: Output) -> None:
        host, port = parse_address(self.settings.address)
        log(f"Running with SSH driver...\nConnecting to {self.user}@{format_address(host, port)}...\n".encode())
        self.connect(host, port, deadline=time.monotonic() + self.timeout)
        self.start(env, log)
        log(f"Established SSH connection to {self.address}, working in {self.workspace}\n".encode())

    def connect(
        self,
        host: str,
        port: int,
        *,
        deadline: float | None = None,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
        alive: Callable[[], None] | None = None,
    ) -> paramiko.Transport:
        """Log in to host:port with the driver's credentials, retrying until `deadline` (see Connection.connect)."""
        return self.connection.connect(host, port, deadline=deadline, attempt_timeout=attempt_timeout, alive=alive)

    def attach(self, client: paramiko.Transport | paramiko.SSHClient, env: Mapping[str, str]) -> None:
        """Use an already connected and authenticated client, then `start(env)`."""
        self.connection.adopt(client.get_transport() if isinstance(client, paramiko.SSHClient) else client)
        self.start(env)

    def start(self, env: Mapping[str, str], log: Output | None = None) -> None:
        """After `connect`: open SFTP, find the workspace, write the environment wrapper."""
        for key, value in env.items():
            if not key or "=" in key or "\0" in key or "\0" in str(value):
                raise DriverError(f"build variable {key!r} cannot be passed over SSH (empty name, '=' or NUL byte)")
        try:
            self.files.open(self.settings.workspace)
            self.session.open(env, log)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self.connection.failure("preparing the build directory", exc) from None

    # --- jobs and files -----------------------------------------------------

    def execute(self, name: str, script: bytes, output: Output) -> int:
        if self.connection.cancelled.is_set():
            return KILLED
        self._ready()
        return self.session.execute(name, script, output)

    def run_command(self, command: str, timeout: float = CONTROL_TIMEOUT) -> tuple[int, bytes]:
        """A short control command on the remote side: (exit status, output); see Session.run_command."""
        return self.session.run_command(command, timeout)

    def key_location(self, name: str) -> str:
        # The remote user's ~/.ssh: /root/.ssh for root, as the default; writable for others.
        if self.home is None:
            return super().key_location(name)
        return posixpath.join(self.home, ".ssh", name)

    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        """Copy data to dest (relative to the workspace, or absolute); see Files.place."""
        if self.connection.cancelled.is_set():
            raise DriverError("the build was cancelled")
        self._ready()
        self.files.place(dest, data, mode)

    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        """(path, stream) per regular file matching source; see Files.collect."""
        # A generator: the check, like every read, runs once the caller starts iterating.
        self._ready()
        yield from self.files.collect(source)

    # --- ending -------------------------------------------------------------

    def cancel(self) -> None:
        """Abort a connection attempt or kill the running job's processes, and refuse new work."""
        self.connection.cancel()
        self.session.kill_running()

    def destroy(self) -> None:
        self.cancel()
        self.session.close()
        self.files.close()
        self.connection.close()

    def _ready(self) -> None:
        """Connected and started: what place, execute and collect need."""
        self.connection.require()
        if self.files.sftp is None or self.session.private_dir is None:
            raise DriverError("the ssh driver was used before it was started (or after it was destroyed)")


DRIVER = SSHDriver
