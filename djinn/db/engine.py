"""Connecting to PostgreSQL from the worker config's `database` block."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar, cast

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, CursorResult, Result
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from djinn.config import DatabaseSettings, split_address
from djinn.errors import DatabaseError

log = logging.getLogger(__name__)


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL stayed unreachable for as long as the caller was willing to wait."""


def database_url(settings: DatabaseSettings) -> URL:
    host, port = split_address(settings.addr, 5432)
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
        port=port,
        database=settings.name,
        query=query,
    )


# A pooled connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE = 1.0
T = TypeVar("T")


def make_engine(settings: DatabaseSettings, *, idle_transaction_timeout: float | None = None, **kwargs: Any) -> Engine:
    """An engine that survives a restarted server without a round trip per checkout.

    SQLAlchemy's pool_pre_ping would ping before every use, several times a build.
    Here only a connection that sat idle for PING_AFTER_IDLE is pinged (a server
    restart between builds is noticed there and the connection replaced); one used
    moments ago is trusted, and `retry_on_disconnect` covers the rare restart that
    falls within that moment.

    With `idle_transaction_timeout` (seconds) the server ends a transaction whose
    client went quiet in the middle of it: a frozen worker (SIGSTOP, a paused VM)
    must not keep a build's row locked, or nobody could take the build over.
    """
    kwargs.setdefault("pool_size", 4)
    # The server's TIMESTAMP columns hold UTC wall-clock time: now() and the times the
    # worker writes must be UTC whatever the server's or the machine's time zone.
    kwargs.setdefault("connect_args", {"connect_timeout": 5, "options": "-c timezone=UTC"})
    # Many-row UPDATEs in one round trip (psycopg2's execute_batch); no caller reads their rowcount.
    kwargs.setdefault("executemany_mode", "values_plus_batch")
    engine = create_engine(database_url(settings), **kwargs)
    _ping_when_idle(engine)
    if idle_transaction_timeout:
        _end_idle_transactions(engine, idle_transaction_timeout)
    return engine


def _end_idle_transactions(engine: Engine, seconds: float) -> None:
    milliseconds = max(int(seconds * 1000), 1000)

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        # A SET per connection rather than a startup option: connection poolers refuse unknown startup options.
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET idle_in_transaction_session_timeout = {milliseconds}")
            dbapi_connection.commit()
        except Exception as exc:  # an older server or a pooler that refuses it: run without
            log.warning("cannot set idle_in_transaction_session_timeout: %s", exc)
            dbapi_connection.rollback()

    event.listen(engine, "connect", on_connect)


def _ping_when_idle(engine: Engine) -> None:
    def mark(dbapi_connection: Any, record: Any) -> None:
        record.info["last_used"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("last_used", 0.0) < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc  # the pool reconnects

    event.listen(engine, "connect", mark)
    event.listen(engine, "checkin", mark)
    event.listen(engine, "checkout", checkout)


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A pooled connection in autocommit, for statements atomic by themselves (or a transaction of one's own).

    SQLAlchemy's `isolation_level="AUTOCOMMIT"` costs a `SET default_transaction_isolation`
    round trip when the connection goes back to the pool, on every build's claim and
    final write; psycopg2's own autocommit switch sends nothing to the server.
    """
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None  # a connection just checked out
        dbapi.autocommit = True
        try:
            yield conn
        finally:
            if not dbapi.closed:  # a connection lost under the statement is discarded anyway
                dbapi.autocommit = False


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


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the server could not be used just now (down, restarting, connection lost).

    Such work may succeed when tried again; an error in the SQL itself never does.
    """
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def retry_while_unavailable(
    call: Callable[[], T],
    *,
    patience: float,
    stop: Callable[[], bool] = lambda: False,
    what: str = "database work",
    first_delay: float = 0.2,
    max_delay: float = 2.0,
) -> T:
    """Run `call` again and again with backoff while PostgreSQL is unreachable.

    `call` opens its own connection or transaction (`in_transaction` makes one).
    Raises DatabaseUnavailable once `patience` seconds have passed, or as soon as
    `stop()` is true, without having run `call` to its end; any other error at once.
    """
    deadline = time.monotonic() + patience
    delay = first_delay
    failures = 0
    while True:
        try:
            result = call()
            if failures:
                log.info("%s: PostgreSQL answered again after %d failed tries", what, failures)
            return result
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            failures += 1
            reason = _first_line(exc)
            if stop() or time.monotonic() + delay > deadline:
                raise DatabaseUnavailable(f"{what}: PostgreSQL unreachable for {failures} tries: {reason}") from None
            if failures == 1 or failures % 10 == 0:
                log.warning("%s: PostgreSQL unreachable (%s); trying again", what, reason)
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


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


def in_transaction(factory: sessionmaker[Session], work: Callable[[Session], T]) -> Callable[[], T]:
    """`work` as a call that runs it in a transaction of its own (for `retry_while_unavailable`)."""

    def call() -> T:
        with transaction(factory) as session:
            return work(session)

    return call


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (its result is a CursorResult, which the Result type hides)."""
    return cast(CursorResult[Any], result).rowcount
