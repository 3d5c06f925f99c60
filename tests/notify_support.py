"""Real receivers for the worker's notifications: an SMTP server (aiosmtpd) and an HTTP recorder.

- `smtp_servers`: a factory of aiosmtpd servers on loopback, plain, STARTTLS or
  implicit TLS (certificates made here with `cryptography`), with AUTH when
  given users; every accepted message is kept with how it arrived.
- `http_recorder`: a threaded HTTP server keeping every request, answering with
  the codes a test queues per path (201 otherwise), standing in for GitHub,
  GitLab and webhook receivers.
- `certs`: a throwaway CA and a server certificate for 127.0.0.1/localhost.

Plain helpers (not fixtures) seed the rows a notification needs.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import ssl
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from services import free_port
from sqlalchemy import create_engine, text

# The crypto block of WorkerEnv.write_config: secrets the tests store must decrypt in the worker.
CRYPTO_BLOCK = "0123456789abcdef0123456789abcdef"
CRYPTO_SALT = "test-salt"


# -- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate it signed, valid for 127.0.0.1 and localhost."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "djinn test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


# -- SMTP -----------------------------------------------------------------------------


@dataclass
class Received:
    """One message the server accepted, and how the client delivered it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None
    mechanism: str | None
    at: float

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def body(self) -> str:
        return self.message.get_content().replace("\r\n", "\n")


class _Handler:
    def __init__(self, server: "SMTPServer") -> None:
        self.server = server

    async def handle_DATA(self, smtp, session, envelope):
        login = mechanism = None
        if session.authenticated and isinstance(session.auth_data, tuple):
            login, mechanism = session.auth_data
        tls = smtp.transport is not None and smtp.transport.get_extra_info("ssl_object") is not None
        self.server._received(
            Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content),
                     tls, login, mechanism, time.monotonic())
        )
        return "250 Message accepted for delivery"


class SMTPServer:
    """An aiosmtpd server on 127.0.0.1:<port> that can be stopped and started again on the same port.

    tls: None (plain), "starttls" (STARTTLS required) or "implicit" (TLS from the first byte).
    users: {login: password}; when given, AUTH is required (PLAIN and LOGIN, over TLS only);
    exclude_auth: mechanisms not offered, e.g. ("PLAIN",).
    """

    def __init__(self, *, port: int | None = None, tls: str | None = None, certs: Certs | None = None,
                 users: dict[str, str] | None = None, exclude_auth: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.certs = certs
        self.users = users or {}
        self.exclude_auth = exclude_auth
        self.messages: list[Received] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _received(self, received: Received) -> None:
        with self._lock:
            self.messages.append(received)

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.users.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        self.auth_attempts.append((login, mechanism, ok))
        return AuthResult(success=ok, handled=False, auth_data=(login, mechanism) if ok else None)

    def start(self) -> "SMTPServer":
        kwargs: dict = {}
        if self.tls == "starttls":
            kwargs.update(tls_context=self.certs.server_context(), require_starttls=True)
        elif self.tls == "implicit":
            kwargs.update(ssl_context=self.certs.server_context())
        if self.users:
            # aiosmtpd only counts STARTTLS as TLS for AUTH; implicit TLS is TLS from the first byte anyway.
            kwargs.update(authenticator=self._authenticate, auth_required=True, auth_require_tls=self.tls == "starttls",
                          auth_exclude_mechanism=self.exclude_auth)
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, server_hostname="localhost", **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait(self, count: int = 1, timeout: float = 60.0) -> list[Received]:
        """Wait until at least `count` messages arrived; returns all of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.1)
        raise AssertionError(f"{len(self.messages)} of {count} mail(s) arrived at {self.addr} in {timeout}s")

    def config(self, *, admin: str = "djinn@ci.test", ca: Path | None = None, username: str | None = None,
               password: str | None = None) -> str:
        """The worker config's smtp block for this server."""
        lines = [f'    addr  "{self.addr}"', f'    admin "{admin}"']
        if ca is not None:
            lines.append(f'    ca    "{ca}"')
        if username is not None:
            lines.append(f'    username "{username}"')
        if password is not None:
            lines.append(f'    password "{password}"')
        return "smtp {\n" + "\n".join(lines) + "\n}\n"


@pytest.fixture
def smtp_servers():
    """Make SMTP servers (started unless start=False); all are stopped at the end of the test."""
    made: list[SMTPServer] = []

    def make(*, start: bool = True, **kwargs) -> SMTPServer:
        server = SMTPServer(**kwargs)
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.stop()


# -- HTTP -------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def json(self):
        return json.loads(self.body)


class HTTPRecorder:
    """Keeps every request; answers each path with queued codes, then `default_code`."""

    def __init__(self, default_code: int = 201) -> None:
        self.requests: list[Request] = []
        self.default_code = default_code
        self._answers: dict[str, deque[int]] = defaultdict(deque)
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with recorder._lock:
                    recorder.requests.append(Request("POST", self.path, {k: v for k, v in self.headers.items()}, body))
                    queued = recorder._answers.get(self.path)
                    code = queued.popleft() if queued else recorder.default_code
                payload = json.dumps({"ok": code < 300}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, *codes: int) -> None:
        with self._lock:
            self._answers[path].extend(codes)

    def received(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait(self, count: int, path: str | None = None, timeout: float = 60.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{len(self.received(path))} of {count} request(s) to {path or 'any path'} in {timeout}s: "
                             f"{[(r.path, r.body[:200]) for r in self.received()]}")


@pytest.fixture
def http_recorder():
    recorder = HTTPRecorder()
    recorder.thread.start()
    yield recorder
    recorder.server.shutdown()
    recorder.server.server_close()


# -- rows ---------------------------------------------------------------------------------


def cipher():
    from djinn.config import CryptoSettings
    from djinn.crypto import Cipher

    return Cipher(CryptoSettings(CRYPTO_BLOCK, CRYPTO_SALT))


def insert(env, table: str, **values) -> int:
    """Insert one row, returning its id (values go in as bind parameters)."""
    columns = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    engine = create_engine(env.url)
    try:
        with engine.begin() as conn:
            return conn.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({params}) RETURNING id"), values).scalar_one()
    finally:
        engine.dispose()


def add_user(env, username: str, email: str | None = None) -> int:
    # The server's users need a unique address and a password hash; an .invalid address gets no mail.
    return insert(env, "users", username=username, email=email or f"{username}@no-mail.invalid", password=b"")


def add_namespace(env, owner_id: int, path: str) -> int:
    return insert(env, "namespaces", user_id=owner_id, name=path.rsplit("/", 1)[-1], path=path, visibility="private",
                  level=path.count("/"))


def add_collaborator(env, namespace_id: int, user_id: int) -> int:
    return insert(env, "namespace_collaborators", namespace_id=namespace_id, user_id=user_id)


def submit_build(env, manifest: str, *, username: str, email: str | None = None, trigger=None, secrets: dict | None = None) -> int:
    """Submit through djinn.db.submit (as a Djinn server would), queued on the test's Redis."""
    from celery import Celery

    from djinn.db.engine import sessions
    from djinn.db.submit import submit
    from djinn.runner.engine import Variable
    from djinn.worker.queue import RUN_BUILD

    engine = create_engine(env.url)
    app = Celery(broker=env.redis.url)
    try:
        submitted = submit(
            sessions(engine),
            manifest,
            username=username,
            email=email,
            variables=[Variable(k, v, True) for k, v in (secrets or {}).items()],
            cipher=cipher(),
            trigger=trigger,
            enqueue=lambda build_id, queue: app.send_task(RUN_BUILD, args=[build_id], queue=queue),
        )
    finally:
        engine.dispose()
    return submitted.id
