"""Reaching and logging in to the server: addresses, the key, the retrying login, cancel.

`Connection` owns the build's SSH link: the credentials, the authenticated
paramiko.Transport once there is one, and the attempt under way, which
`cancel` closes. Its lock and cancelled event are also the session's: what
another thread's `cancel` may touch is guarded by that one lock.

Host keys are not verified, as upstream: build hosts and VMs are recreated
often and the driver config has no place for known hosts.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

import paramiko

from djinn.config.language import format_duration
from djinn.config.settings import split_address
from djinn.errors import DriverError

DEFAULT_PORT = 22
#: How long one connection attempt waits for the TCP connect and for the server's
#: banner. qemu's user-mode network accepts TCP before the guest listens, so an
#: attempt without its own bound can hang for a long time on a dead connection.
ATTEMPT_TIMEOUT = 1.5
#: Pause between attempts that failed quickly (connection refused, reset).
RETRY_PAUSE = 0.2
#: Pause after a refused login, so a wrong password does not hammer the server.
AUTH_RETRY_PAUSE = 1.0

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


def load_key(path: str | None) -> paramiko.PKey | None:
    """The private key file at `path` (None: no key), or a DriverError saying why it cannot be used."""
    if not path:
        return None
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


class _AuthFailed(Exception):
    """The server refused every method we tried (retried until the deadline: it may still be setting up)."""

    def __init__(self, tried: list[str], allowed: list[str] | None) -> None:
        self.tried = tried
        self.allowed = allowed
        accepts = f"; the server accepts: {', '.join(allowed)}" if allowed else ""
        super().__init__(f"authentication failed (tried: {', '.join(tried) or 'nothing'}{accepts})")


class _Cancelled(Exception):
    pass


class Connection:
    """One server's SSH link: log in with the driver's credentials, hold the transport, cancel an attempt.

    `password` None is not configured; "" is an empty password, tried with the
    `none` method first. With neither password nor key it tries `none` and the
    empty password, as Djinn images allow.
    """

    def __init__(self, user: str, password: str | None, key_file: str | None, timeout: float) -> None:
        self.user = user
        self.password = password
        self.key_file = key_file
        self.timeout = timeout
        self.transport: paramiko.Transport | None = None
        self.address: str | None = None  # host:port, for messages
        #: Guards the transport, the attempt and the session's running channel against `cancel`.
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self._attempt: socket.socket | paramiko.Transport | None = None

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
        pkey = load_key(self.key_file)
        last: Exception | None = None
        refused: _AuthFailed | None = None  # once the server answered, that is the news
        while True:
            if self.cancelled.is_set():
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
                with self.lock:
                    if not self.cancelled.is_set():
                        self.transport = transport
                        return transport
                transport.close()
                continue
            pause = min(pause, deadline - time.monotonic())
            if pause > 0:
                self.cancelled.wait(pause)

    def adopt(self, transport: paramiko.Transport | None) -> None:
        """Use a transport connected and logged in elsewhere."""
        if transport is None or not transport.is_authenticated():
            raise DriverError("the ssh driver was given a client that is not connected and logged in")
        with self.lock:
            self.transport = transport
        if self.address is None:
            peer = transport.getpeername()
            self.address = format_address(str(peer[0]), int(peer[1]))

    def require(self) -> paramiko.Transport:
        """The connected transport, or a DriverError when there is none."""
        transport = self.transport
        if transport is None:
            raise DriverError("the ssh driver was used before it was connected (or after it was destroyed)")
        return transport

    def failure(self, doing: str, exc: BaseException) -> DriverError:
        """`exc`, raised while `doing`, as the DriverError to report (a lost connection says so)."""
        if isinstance(exc, DriverError):
            return exc
        if self.transport is not None and not self.transport.is_active():
            return DriverError(f"{doing}: the SSH connection to {self.address} was lost")
        detail = str(exc) or type(exc).__name__
        return DriverError(f"{doing} on {self.address}: {detail}")

    def cancel(self) -> None:
        """Refuse new attempts and close the one under way (the connected transport stays, for cleaning up)."""
        self.cancelled.set()
        with self.lock:
            attempt = self._attempt
        if attempt is not None:
            attempt.close()

    def close(self) -> None:
        """Close the transport, once."""
        with self.lock:
            transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()

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

    def _attempt_login(
        self, host: str, port: int, pkey: paramiko.PKey | None, attempt_timeout: float, deadline: float
    ) -> paramiko.Transport:
        sock = socket.create_connection((host, port), timeout=max(attempt_timeout, 0.05))
        transport: paramiko.Transport | None = None
        try:
            with self.lock:
                if self.cancelled.is_set():
                    raise _Cancelled()
                self._attempt = sock
            transport = paramiko.Transport(sock)
            transport.set_log_channel(_ATTEMPT_LOG)
            with self.lock:
                self._attempt = transport
            remaining = max(deadline - time.monotonic(), attempt_timeout)
            transport.banner_timeout = attempt_timeout
            transport.handshake_timeout = remaining
            transport.auth_timeout = remaining
            done = threading.Event()
            transport.start_client(event=done)
            while not done.wait(0.05):
                if self.cancelled.is_set():
                    raise _Cancelled()
                if not transport.is_active():
                    break
                if time.monotonic() >= deadline:
                    raise paramiko.SSHException(_NO_BANNER if not transport.remote_version else "the SSH key exchange did not finish in time")
            if not transport.is_active():
                if self.cancelled.is_set():
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
            with self.lock:
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
        if self.cancelled.is_set():
            raise _Cancelled()
        raise _AuthFailed(tried, allowed)
