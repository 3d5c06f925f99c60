"""Connecting to PostgreSQL from the worker config's `database` block."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
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


def make_engine(settings: DatabaseSettings, **kwargs) -> Engine:
    """An engine that checks pooled connections before use, so a restarted server is survived."""
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 4)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(database_url(settings), **kwargs)


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
