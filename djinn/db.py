"""Connecting to PostgreSQL from the worker config's `database` block."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from djinn.config import DatabaseSettings
from djinn.errors import DjinnError


class DatabaseError(DjinnError):
    """PostgreSQL cannot be reached or refused what the worker asked."""


def database_url(settings: DatabaseSettings) -> URL:
    host, _, port = settings.addr.rpartition(":") if ":" in settings.addr else (settings.addr, "", "")
    query: dict[str, str] = {}
    if settings.tls is not None:
        query["sslmode"] = "verify-full" if settings.tls.ca else "require"
        for name, value in (("sslrootcert", settings.tls.ca), ("sslcert", settings.tls.cert), ("sslkey", settings.tls.key)):
            if value:
                query[name] = value
    return URL.create(
        "postgresql+psycopg2",
        username=settings.username or None,
        password=settings.password or None,
        host=host or "localhost",
        port=int(port) if port else None,
        database=settings.name,
        query=query,
    )


# A pooled connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE = 1.0
T = TypeVar("T")


def make_engine(settings: DatabaseSettings, **kwargs) -> Engine:
    """An engine that survives a restarted server without a round trip per checkout.

    SQLAlchemy's pool_pre_ping would ping before every use, several times a build.
    Here only a connection that sat idle for PING_AFTER_IDLE is pinged (a server
    restart between builds is noticed there and the connection replaced); one used
    moments ago is trusted, and `retry_on_disconnect` covers the rare restart that
    falls within that moment.
    """
    kwargs.setdefault("pool_size", 4)
    # The server's TIMESTAMP columns hold UTC wall-clock time: now() and the times the
    # worker writes must be UTC whatever the server's or the machine's time zone.
    kwargs.setdefault("connect_args", {"connect_timeout": 5, "options": "-c timezone=UTC"})
    # Many-row UPDATEs in one round trip (psycopg2's execute_batch); no caller reads their rowcount.
    kwargs.setdefault("executemany_mode", "values_plus_batch")
    engine = create_engine(database_url(settings), **kwargs)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    def mark(dbapi_connection, record) -> None:
        record.info["last_used"] = time.monotonic()

    def checkout(dbapi_connection, record, proxy) -> None:
        if time.monotonic() - record.info.get("last_used", 0.0) < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc  # the pool reconnects

    event.listen(engine, "connect", mark)
    event.listen(engine, "checkin", mark)
    event.listen(engine, "checkout", checkout)


def retry_on_disconnect(factory: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """Run `work` in a transaction; once more if the server closed the connection under it."""
    try:
        with transaction(factory) as session:
            return work(session)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with transaction(factory) as session:
        return work(session)


def check_connection(engine: Engine) -> None:
    """Raise DatabaseError with the server's answer when PostgreSQL cannot be used."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseError(f"cannot connect to PostgreSQL at {engine.url.host}:{engine.url.port or 5432}: {reason}") from None


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session
