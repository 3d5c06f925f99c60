"""The ssh driver: job scripts run on another machine over SSH (paramiko).

It is also the session layer of the qemu driver, which boots a VM and then
calls `connect` and `start` on its own address; everything after that
(`place`, `execute`, `collect`, `cancel`, `destroy`) works on whatever
connected transport the driver holds.

Layout on the remote side:
- the workspace (cwd of every job; base of relative object, key and artifact
  paths) is the remote user's home directory, as upstream, or the driver
  map's `workspace` (absolute, or relative to the home), created if missing;
- a private directory `/tmp/.djinn-<random>` (mode 0700; the home directory
  when /tmp is not writable) holds the environment wrapper, the job scripts
  while they run and their pid files. It is removed by `destroy`; files the
  jobs write into the workspace stay, as the host is not ours to wipe.

The build environment is written into the wrapper script (`export K='v'`,
mode 0700) rather than sent as SSH `env` requests: those need `AcceptEnv`
on the server and sshd drops refused ones silently, and putting the values on
the command line would show masked values in the remote `ps`. Variables whose
names are not shell names are left out (with a line in the setup output), as
only env(1) on a command line could set them.

Artifacts are resolved on the server (SFTP realpath) and refused when any
symlink along the path leads out of the workspace.

Each job runs as `exec /bin/sh <wrapper> <script> <pidfile>`, so the job's
shell is the session leader sshd made (setsid) and its pid names the job's
process group. Closing a channel does not stop remote processes, so `cancel`
(and a job whose background children keep its output open after it exited)
SIGKILLs that group through a second exec channel.

Host keys are not verified, as upstream: build hosts and VMs are recreated
often and the driver config has no place for known hosts.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import logging
import posixpath
import re
import secrets
import shlex
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping, cast

import paramiko

from djinn.config.language import format_duration
from djinn.config.settings import SSHSettings, setting, split_address
from djinn.drivers.base import BuildIdentity, Driver, Output
from djinn.drivers.environment import refused_names_message, shell_exports
from djinn.errors import DriverError
from djinn.paths import PathEscapeError

DEFAULT_PORT = 22
#: How long one connection attempt waits for the TCP connect and for the server's
#: banner. qemu's user-mode network accepts TCP before the guest listens, so an
#: attempt without its own bound can hang for a long time on a dead connection.
ATTEMPT_TIMEOUT = 1.5
#: Pause between attempts that failed quickly (connection refused, reset).
RETRY_PAUSE = 0.2
#: Pause after a refused login, so a wrong password does not hammer the server.
AUTH_RETRY_PAUSE = 1.0
#: Output read size, and the SFTP request size.
CHUNK = 32768
#: Artifacts are downloaded in pipelined windows of this many bytes (bounded memory).
WINDOW = 4 << 20
#: After a job's shell exited: how long its channel may stay open (background
#: children holding the output) before they are killed, then how long to drain.
SETTLE_SECONDS = 0.3
DRAIN_SECONDS = 2.0
#: Bound on the small commands the driver runs itself (kill) and on SFTP replies.
CONTROL_TIMEOUT = 10.0
SFTP_TIMEOUT = 60.0

KILLED = -signal.SIGKILL

# paramiko logs every failed attempt (a booting VM gives many) as an ERROR with a
# traceback, which Python prints on stderr when logging is not configured. Attempts
# log here, nowhere; the final error names the last reason. A connected transport
# logs to paramiko's usual logger again.
_ATTEMPT_LOG = "djinn.drivers.ssh.attempts"
_quiet = logging.getLogger(_ATTEMPT_LOG)
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False
_NO_BANNER = "the server accepted the connection but sent no SSH banner"


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` as (host, port)."""
    if not (address or "").strip():
        raise DriverError("the ssh driver needs an address (host:port) in the manifest's driver map")
    try:
        host, port = split_address(address.strip(), default_port)
    except ValueError as exc:
        raise DriverError(f"invalid ssh address {address!r}: {exc}") from None
    if not host:
        raise DriverError(f"invalid ssh address {address!r}: the host is missing")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _q(text: str) -> str:
    return shlex.quote(text)


class _AuthFailed(Exception):
    """The server refused every method we tried (retried until the deadline: it may still be setting up)."""

    def __init__(self, tried: list[str], allowed: list[str] | None) -> None:
        self.tried = tried
        self.allowed = allowed
        accepts = f"; the server accepts: {', '.join(allowed)}" if allowed else ""
        super().__init__(f"authentication failed (tried: {', '.join(tried) or 'nothing'}{accepts})")


class _Cancelled(Exception):
    pass


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
    to connect and log in), `workspace` (optional, see the module docstring).
    With neither password nor key the driver tries `none` and the empty password,
    as Djinn images allow.
    """

    type = "ssh"
    Settings = SSHRunSettings
    settings: SSHRunSettings

    def __init__(self, values: Mapping[str, Any] | None = None, identity: BuildIdentity | None = None, *, configured: Any = None) -> None:
        super().__init__(values, identity, configured=configured)
        s = self.settings
        self.user: str = s.user
        self.password: str | None = s.password
        self.key_file: str | None = s.key
        self.timeout: float = s.timeout.total_seconds()
        self.transport: paramiko.Transport | None = None
        self.sftp: paramiko.SFTPClient | None = None
        self.address: str | None = None  # host:port, for messages
        self.home: str | None = None
        self.workspace: str | None = None
        self._real_workspace: str | None = None  # the workspace with symlinks resolved on the server
        self.private_dir: str | None = None
        self._wrapper: str | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._attempt: socket.socket | paramiko.Transport | None = None
        self._channel: paramiko.Channel | None = None
        self._pidfile: str | None = None
        self._kill_lock = threading.Lock()  # one remote kill per job, finished before anything closes
        self._killed: str | None = None

    @classmethod
    def check(cls, configured: Any) -> None:
        """At worker start-up: a configured key is readable (the address comes per build)."""
        cls(configured=cls.settings_of(configured))._load_key()

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
        """Log in to host:port with the driver's credentials, retrying until `deadline`.

        `deadline` is a time.monotonic() value (default: now + the `timeout`
        setting). Each attempt waits at most `attempt_timeout` for the TCP
        connection and the server's banner, so a connection that was accepted
        but never answers cannot eat the deadline; key exchange and login may
        take until the deadline (slow emulated guests). `alive` is called
        before each attempt and may raise DriverError (e.g. the VM exited).
        `cancel()` makes this raise promptly. Wrong credentials are retried
        too (a booting machine may not have its users yet) and reported
        clearly at the deadline.
        """
        started = time.monotonic()
        if deadline is None:
            deadline = started + self.timeout
        self.address = format_address(host, port)
        pkey = self._load_key()
        last: Exception | None = None
        refused: _AuthFailed | None = None  # once the server answered, that is the news
        while True:
            if self._cancelled.is_set():
                raise DriverError(f"connecting to {self.address} was cancelled")
            if alive is not None:
                alive()
            now = time.monotonic()
            if now >= deadline:
                raise self._connect_error(refused or last, deadline - started)
            try:
                transport = self._attempt_login(host, port, pkey, min(attempt_timeout, deadline - now), deadline)
            except _Cancelled:
                continue
            except _AuthFailed as exc:
                last = refused = exc
                pause = AUTH_RETRY_PAUSE
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last, pause = exc, RETRY_PAUSE - (time.monotonic() - now)
            else:
                with self._lock:
                    if not self._cancelled.is_set():
                        self.transport = transport
                        return transport
                transport.close()
                continue
            pause = min(pause, deadline - time.monotonic())
            if pause > 0:
                self._cancelled.wait(pause)

    def _connect_error(self, last: Exception | None, waited: float) -> DriverError:
        within = format_duration(waited)
        if isinstance(last, _AuthFailed):
            return DriverError(
                f"could not log in to {self.address} as {self.user} within {within}: {last}; "
                "check the ssh driver's user, password and key"
            )
        reason = f": {last}" if last is not None and str(last) else (f": {type(last).__name__}" if last else "")
        if isinstance(last, TimeoutError):  # socket.timeout
            reason = ": no answer"
        elif isinstance(last, paramiko.SSHException) and "banner" in str(last):
            reason = f": {_NO_BANNER}"
        return DriverError(f"could not connect to {self.address} (user {self.user}) within {within}{reason}")

    def _load_key(self) -> paramiko.PKey | None:
        if not self.key_file:
            return None
        path = self.key_file
        try:
            if hasattr(paramiko.PKey, "from_path"):
                return paramiko.PKey.from_path(path)
            errors = []
            for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
                try:
                    return cls.from_private_key_file(path)
                except paramiko.PasswordRequiredException:
                    raise
                except paramiko.SSHException as exc:
                    errors.append(str(exc))
            raise paramiko.SSHException("; ".join(errors))
        except OSError as exc:
            raise DriverError(f"cannot read the ssh driver's key {path}: {exc.strerror or exc}") from None
        except paramiko.PasswordRequiredException:
            raise DriverError(f"the ssh driver's key {path} is encrypted; give a key without a passphrase") from None
        except (paramiko.SSHException, ValueError) as exc:
            raise DriverError(f"the ssh driver's key {path} is not a private key paramiko can read: {exc}") from None

    def _attempt_login(
        self, host: str, port: int, pkey: paramiko.PKey | None, attempt_timeout: float, deadline: float
    ) -> paramiko.Transport:
        sock = socket.create_connection((host, port), timeout=max(attempt_timeout, 0.05))
        transport: paramiko.Transport | None = None
        try:
            with self._lock:
                if self._cancelled.is_set():
                    raise _Cancelled()
                self._attempt = sock
            transport = paramiko.Transport(sock)
            transport.set_log_channel(_ATTEMPT_LOG)
            with self._lock:
                self._attempt = transport
            remaining = max(deadline - time.monotonic(), attempt_timeout)
            transport.banner_timeout = attempt_timeout
            transport.handshake_timeout = remaining
            transport.auth_timeout = remaining
            done = threading.Event()
            transport.start_client(event=done)
            while not done.wait(0.05):
                if self._cancelled.is_set():
                    raise _Cancelled()
                if not transport.is_active():
                    break
                if time.monotonic() >= deadline:
                    raise paramiko.SSHException(_NO_BANNER if not transport.remote_version else "the SSH key exchange did not finish in time")
            if not transport.is_active():
                if self._cancelled.is_set():
                    raise _Cancelled()
                raise transport.get_exception() or paramiko.SSHException("SSH negotiation failed")
            self._authenticate(transport, pkey)
            transport.set_log_channel("paramiko.transport")
            transport.set_keepalive(15)
            return transport
        except BaseException:
            if transport is not None:
                transport.close()
            sock.close()
            raise
        finally:
            with self._lock:
                self._attempt = None

    def _authenticate(self, transport: paramiko.Transport, pkey: paramiko.PKey | None) -> None:
        tried: list[str] = []
        allowed: list[str] | None = None

        def attempt(method: str, call: Callable[[], object]) -> bool:
            nonlocal allowed
            tried.append(method)
            try:
                call()
            except paramiko.BadAuthenticationType as exc:
                allowed = list(exc.allowed_types)
            except paramiko.AuthenticationException:
                pass
            return bool(transport.is_authenticated())

        if pkey is not None and attempt("publickey", lambda: transport.auth_publickey(self.user, pkey)):
            return
        password = self.password
        if password is None and pkey is None:
            password = ""  # Djinn images: root with an empty password
        if password is not None:
            if password == "" and attempt("none", lambda: transport.auth_none(self.user)):
                return
            # paramiko falls back to keyboard-interactive when the server allows only that.
            if attempt("password", lambda: transport.auth_password(self.user, password)):
                return
        if self._cancelled.is_set():
            raise _Cancelled()
        raise _AuthFailed(tried, allowed)

    def attach(self, client: paramiko.Transport | paramiko.SSHClient, env: Mapping[str, str]) -> None:
        """Use an already connected and authenticated client, then `start(env)`."""
        transport = client.get_transport() if isinstance(client, paramiko.SSHClient) else client
        if transport is None or not transport.is_authenticated():
            raise DriverError("the ssh driver was given a client that is not connected and logged in")
        with self._lock:
            self.transport = transport
        if self.address is None:
            peer = transport.getpeername()
            self.address = format_address(str(peer[0]), int(peer[1]))
        self.start(env)

    def start(self, env: Mapping[str, str], log: Output | None = None) -> None:
        """After `connect`: open SFTP, find the workspace, write the environment wrapper."""
        for key, value in env.items():
            if not key or "=" in key or "\0" in key or "\0" in str(value):
                raise DriverError(f"build variable {key!r} cannot be passed over SSH (empty name, '=' or NUL byte)")
        try:
            try:
                self.sftp = paramiko.SFTPClient.from_transport(self._transport())
            except (EOFError, paramiko.SSHException) as exc:
                raise DriverError(
                    f"{self.address} offers no SFTP ({exc or type(exc).__name__}): the server's sshd_config "
                    "needs a Subsystem sftp line, e.g. 'Subsystem sftp internal-sftp'"
                ) from None
            self.sftp.get_channel().settimeout(SFTP_TIMEOUT)
            self._transport().channel_timeout = SFTP_TIMEOUT  # bounds open_session when no timeout is given
            self.home = self.sftp.normalize(".")
            workspace = self.settings.workspace
            self.workspace = posixpath.normpath(posixpath.join(self.home, workspace)) if workspace else self.home
            self._makedirs(self.workspace, 0o755)
            self.private_dir = self._make_private_dir()
            self._real_workspace = self.sftp.normalize(self.workspace)
            self._wrapper = f"{self.private_dir}/run"
            script, refused = self._wrapper_script(env)
            if refused and log is not None:
                log(refused_names_message(refused))
            self._write(self._wrapper, io.BytesIO(script), 0o700)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure("preparing the build directory", exc) from None

    def _make_private_dir(self) -> str:
        assert self.sftp is not None and self.home is not None
        errors = []
        for base in ("/tmp", self.home):
            path = posixpath.join(base, f".djinn-{secrets.token_hex(8)}")
            try:
                self.sftp.mkdir(path, 0o700)
                self.sftp.chmod(path, 0o700)  # mkdir's mode is subject to the server's umask
                return path
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        raise DriverError(f"cannot make a directory for job scripts on {self.address}: {'; '.join(errors)}")

    def _wrapper_script(self, env: Mapping[str, str]) -> tuple[bytes, list[str]]:
        """sh script: records its pid (= the job's process group), enters the workspace, execs the job with the env.

        Also the names left out because a shell cannot set them.
        """
        assert self.workspace is not None
        lines = [
            "#!/bin/sh",
            "# Written by djinn: runs a job script ($1) with the build environment; pid to $2.",
            'echo $$ > "$2"',
            f"cd {_q(self.workspace)} || exit 1",
        ]
        exports, refused = shell_exports(env)
        script = ("\n".join(lines) + "\n").encode() + exports + b'exec /bin/sh "$1"\n'
        return script, refused

    # --- jobs ---------------------------------------------------------------

    def execute(self, name: str, script: bytes, output: Output) -> int:
        if self._cancelled.is_set():
            return KILLED
        self._ready()
        assert self.private_dir is not None
        safe = re.sub(r"[^A-Za-z0-9._-]", "-", name) or "job"
        path = f"{self.private_dir}/{safe}.sh"
        pidfile = f"{self.private_dir}/{safe}.pid"
        try:
            self._write(path, io.BytesIO(script), 0o755)
            try:
                return self._run(path, pidfile, output)
            finally:
                self._remove(path, pidfile)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self._cancelled.is_set():
                return KILLED
            raise self._failure(f"running job {name}", exc) from None

    def _run(self, path: str, pidfile: str, output: Output) -> int:
        assert self._wrapper is not None
        channel = self._transport().open_session(timeout=CONTROL_TIMEOUT)
        try:
            channel.set_combine_stderr(True)
            with self._lock:
                if self._cancelled.is_set():
                    return KILLED
                self._channel, self._pidfile, self._killed = channel, pidfile, None
            # `exec` so the wrapper replaces the login shell, the session leader sshd made
            # with setsid(): its pid is the job's process group, which cancel kills.
            channel.exec_command(f"exec /bin/sh {_q(self._wrapper)} {_q(path)} {_q(pidfile)}")
            channel.settimeout(0.2)
            exited_at: float | None = None
            swept = False
            while True:
                try:
                    data = channel.recv(CHUNK)
                except TimeoutError:  # socket.timeout
                    if self._cancelled.is_set():
                        self._kill_running()
                        return KILLED
                    if channel.status_event.is_set():
                        # The shell exited but background children still hold the output.
                        now = time.monotonic()
                        if exited_at is None:
                            exited_at = now
                        elif not swept and now - exited_at > SETTLE_SECONDS:
                            self._kill_job(pidfile)
                            swept = True
                        elif now - exited_at > SETTLE_SECONDS + DRAIN_SECONDS:
                            break
                    continue
                if not data:
                    break
                output(data)
            # The output ended (EOF); the exit status follows it, before the channel closes.
            while not channel.status_event.wait(0.1):
                if self._cancelled.is_set() or channel.closed or not self._transport().is_active():
                    break
            if self._cancelled.is_set():
                self._kill_running()
                return KILLED
            if not channel.status_event.is_set():
                if not self._transport().is_active():
                    raise DriverError(f"the SSH connection to {self.address} was lost during the job")
                output(b"\ndjinn: the job ended without an exit status (killed by a signal?)\n")
                return -1
            return int(channel.exit_status)
        except BaseException:
            self._kill_running()  # never leave the job running behind an error
            raise
        finally:
            with self._lock:
                self._channel = self._pidfile = None
            channel.close()

    def run_command(self, command: str, timeout: float = CONTROL_TIMEOUT) -> tuple[int, bytes]:
        """Run a short control command (sh syntax) on the remote side: (exit status, output).

        For the driver's own housekeeping (and the qemu driver's), not for jobs.
        Output beyond 64 KiB is dropped; -1 when no exit status came. Raises
        DriverError when the connection fails or the command outlives `timeout`.
        """
        try:
            channel = self._transport().open_session(timeout=timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure("running a command", exc) from None
        try:
            channel.set_combine_stderr(True)
            channel.settimeout(timeout)
            channel.exec_command(f"exec /bin/sh -c {_q(command)}")
            out = bytearray()
            while data := channel.recv(CHUNK):
                if len(out) < 65536:
                    out += data
            end = time.monotonic() + timeout
            while not channel.status_event.wait(0.05):
                if channel.closed or time.monotonic() > end:
                    break
            return channel.exit_status, bytes(out[:65536])
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure("running a command", exc) from None
        finally:
            channel.close()

    def _kill_job(self, pidfile: str) -> None:
        """SIGKILL the job's process group (fallback: its shell), waiting briefly for the pid file."""
        script = (
            f'f={_q(pidfile)}; p=; i=0; while [ "$i" -lt 20 ]; do p=$(cat "$f" 2>/dev/null); '
            '[ -n "$p" ] && break; i=$((i+1)); sleep 0.1; done; '
            '[ -n "$p" ] && { kill -9 -"$p" 2>/dev/null || kill -9 "$p" 2>/dev/null; }; true'
        )
        try:
            self.run_command(script, timeout=CONTROL_TIMEOUT)
        except DriverError:
            pass  # connection gone: nothing more we can do from here

    # --- files --------------------------------------------------------------

    def key_location(self, name: str) -> str:
        # The remote user's ~/.ssh: /root/.ssh for root, as the default; writable for others.
        if self.home is None:
            return super().key_location(name)
        return posixpath.join(self.home, ".ssh", name)

    def _path(self, path: str) -> str:
        assert self.workspace is not None
        return posixpath.normpath(posixpath.join(self.workspace, path))

    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        """Copy data to dest (relative to the workspace, or absolute), making parent directories.

        The remote machine is the build's own, so absolute paths are allowed (keys go to ~/.ssh).
        Parents are created 0700 for a private file (a key), else 0755.
        """
        if self._cancelled.is_set():
            raise DriverError("the build was cancelled")
        self._ready()
        target = self._path(dest)
        try:
            self._makedirs(posixpath.dirname(target), 0o755 if mode & 0o077 else 0o700)
            self._write(target, data, mode)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure(f"placing {dest} at {target}", exc) from None

    def _write(self, path: str, data: BinaryIO, mode: int) -> None:
        assert self.sftp is not None
        with self.sftp.open(path, "wb") as remote:
            remote.chmod(mode)  # before any byte is written: keys are never readable by others
            remote.set_pipelined(True)
            while chunk := data.read(CHUNK * 8):
                remote.write(chunk)

    def _makedirs(self, path: str, mode: int) -> None:
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
                raise DriverError(f"{path} exists on {self.address} and is not a directory")
            break
        for directory in reversed(missing):
            self.sftp.mkdir(directory, mode)

    def _remove(self, *paths: str) -> None:
        if self.sftp is None:
            return
        for path in paths:
            try:
                self.sftp.remove(path)
            except (OSError, EOFError, paramiko.SSHException):
                pass

    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        """(path, stream) per regular file matching source; `*` in source globs, as SPEC section 4."""
        self._ready()
        assert self.sftp is not None and self.workspace is not None
        try:
            pattern = self._path(source)
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
                    failure = functools.partial(self._failure, f"reading {shown}")
                    yield shown, cast(BinaryIO, _SFTPReader(remote, st.st_size or 0, failure))  # read() is all callers use
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure(f"collecting {source}", exc) from None

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

    # --- ending -------------------------------------------------------------

    def cancel(self) -> None:
        """Abort a connection attempt or kill the running job's processes, and refuse new work."""
        self._cancelled.set()
        with self._lock:
            attempt = self._attempt
        if attempt is not None:
            attempt.close()
        self._kill_running()

    def _kill_running(self) -> None:
        """Kill the running job's processes once; whoever comes second waits for the first.

        Both the cancelling thread and the job's own thread call this, so `execute`
        returns (and the runner goes on to `destroy`, closing the connection) only
        after the remote kill has run.
        """
        with self._lock:
            channel, pidfile = self._channel, self._pidfile
        if channel is None or pidfile is None:
            return
        with self._kill_lock:
            if self._killed != pidfile:
                transport = self.transport
                if transport is not None and transport.is_active():
                    self._kill_job(pidfile)
                self._killed = pidfile
        channel.close()

    def destroy(self) -> None:
        self.cancel()
        with self._lock:
            transport, sftp, private = self.transport, self.sftp, self.private_dir
            self.transport = self.sftp = self.private_dir = None
        if sftp is not None:
            try:
                if private is not None and transport is not None and transport.is_active():
                    sftp.get_channel().settimeout(CONTROL_TIMEOUT)  # a hung link must not hang destroy
                    for name in sftp.listdir(private):
                        sftp.remove(f"{private}/{name}")
                    sftp.rmdir(private)
            except (OSError, EOFError, paramiko.SSHException):
                pass
            finally:
                sftp.close()
        if transport is not None:
            transport.close()

    # --- helpers ------------------------------------------------------------

    def _transport(self) -> paramiko.Transport:
        transport = self.transport
        if transport is None:
            raise DriverError("the ssh driver was used before it was connected (or after it was destroyed)")
        return transport

    def _ready(self) -> None:
        """Connected and started: what place, execute and collect need."""
        self._transport()
        if self.sftp is None or self.private_dir is None:
            raise DriverError("the ssh driver was used before it was started (or after it was destroyed)")

    def _failure(self, doing: str, exc: BaseException) -> DriverError:
        if isinstance(exc, DriverError):
            return exc
        if self.transport is not None and not self.transport.is_active():
            return DriverError(f"{doing}: the SSH connection to {self.address} was lost")
        detail = str(exc) or type(exc).__name__
        return DriverError(f"{doing} on {self.address}: {detail}")


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


DRIVER = SSHDriver
