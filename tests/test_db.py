"""The worker's PostgreSQL connections when the server restarts under them (a real server)."""

from __future__ import annotations

import itertools
import os

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from djinn.config.settings import DatabaseSettings
from djinn.db import engine as db

_names = itertools.count(1)


@pytest.fixture
def sessions(postgres):
    name = f"djinn_db_{os.getpid()}_{next(_names)}"
    postgres.create_database(name)
    engine = db.make_engine(DatabaseSettings(addr=postgres.addr, name=name, username="postgres"))
    yield db.sessions(engine)
    engine.dispose()


def backend_pid(session) -> int:
    return session.scalar(text("SELECT pg_backend_pid()"))


def test_idle_connection_is_pinged_and_replaced_after_a_restart(sessions, postgres, monkeypatch):
    with db.transaction(sessions) as session:
        before = backend_pid(session)
    postgres.restart()
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.0)  # every checkout counts as idle
    with db.transaction(sessions) as session:
        assert backend_pid(session) != before


def test_recently_used_connection_is_not_pinged_and_a_restart_is_retried(sessions, postgres, monkeypatch):
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 3600.0)  # no checkout counts as idle: no ping
    with db.transaction(sessions) as session:
        before = backend_pid(session)
    postgres.restart()

    # Without the retry the dead connection fails the work...
    with pytest.raises(DBAPIError) as failed:
        with db.transaction(sessions) as session:
            backend_pid(session)
    assert failed.value.connection_invalidated

    # ...with it, the work runs again on a new connection.
    with db.transaction(sessions) as session:
        before = backend_pid(session)
    postgres.restart()
    calls = []

    def work(session) -> int:
        calls.append(1)
        return backend_pid(session)

    after = db.retry_on_disconnect(sessions, work)
    assert after != before and len(calls) == 2


def test_retry_on_disconnect_does_not_retry_other_errors(sessions):
    calls = []

    def work(session) -> None:
        calls.append(1)
        session.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(DBAPIError):
        db.retry_on_disconnect(sessions, work)
    assert len(calls) == 1


def test_retry_while_unavailable_waits_for_the_server_and_gives_up_after_its_patience(sessions, postgres):
    import threading
    import time

    calls = []

    def work(session) -> int:
        calls.append(1)
        return backend_pid(session)

    postgres.stop()
    back = threading.Timer(2.0, postgres.start)
    try:
        started = time.monotonic()
        with pytest.raises(db.DatabaseUnavailable) as gave_up:
            db.retry_while_unavailable(db.in_transaction(sessions, work), patience=1.0, what="test work")
        assert "test work: PostgreSQL unreachable" in str(gave_up.value)
        assert time.monotonic() - started < 10
        assert len(calls) >= 2  # tried again before giving up
        calls.clear()
        back.start()
        assert db.retry_while_unavailable(db.in_transaction(sessions, work), patience=60.0) > 0
    finally:
        if back.is_alive() or back.finished.is_set():
            back.join()
        else:
            postgres.start()
    assert len(calls) >= 2  # failed while the server was away, then ran


def test_retry_while_unavailable_stops_when_asked_and_not_for_bad_sql(sessions, postgres):
    with pytest.raises(DBAPIError):
        db.retry_while_unavailable(db.in_transaction(sessions, lambda s: s.execute(text("SELECT * FROM no_such_table"))), patience=30.0)
    postgres.stop()
    try:
        with pytest.raises(db.DatabaseUnavailable):
            db.retry_while_unavailable(db.in_transaction(sessions, backend_pid), patience=3600.0, stop=lambda: True)
    finally:
        postgres.start()


def test_autocommit_connection_goes_back_to_the_pool_transactional(sessions):
    """Each statement commits by itself inside; the same pooled connection then runs transactions again."""
    engine = sessions.kw["bind"]
    with db.autocommit(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE t (n int)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with pytest.raises(DBAPIError):
        with db.autocommit(engine) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
            conn.exec_driver_sql("SELECT no_such_column FROM t")
    with sessions() as session:
        assert backend_pid(session) == pid  # the pool's one connection, not a new one
        assert session.connection().connection.dbapi_connection.autocommit is False
        session.execute(text("INSERT INTO t VALUES (3)"))
        session.rollback()  # undone: a transaction, not autocommit
        assert session.scalars(text("SELECT n FROM t ORDER BY n")).all() == [1, 2]
