"""Submission's rows against a real PostgreSQL: numbers, the setup stage, stored variables and keys."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.exc import DBAPIError

from djinn.config.settings import CryptoSettings
from djinn.crypto import Cipher
from djinn.db.engine import sessions as make_sessions
from djinn.db.submit import submit
from djinn.runner.engine import Key, Variable

CIPHER = Cipher(CryptoSettings(block="0123456789abcdef0123456789abcdef", salt="test-salt"))
PLAIN = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"


@pytest.fixture
def sessions(worker_env):
    engine = create_engine(worker_env.url, pool_size=8)
    yield make_sessions(engine)
    engine.dispose()


def _submit(sessions, manifest=PLAIN, **kwargs):
    return submit(sessions, manifest, username="alice", cipher=CIPHER, enqueue=lambda build_id, queue: None, **kwargs)


def test_numbers_count_up_per_owner_and_concurrent_submissions_never_share_one(worker_env, sessions):
    first = _submit(sessions)
    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(lambda _: _submit(sessions).number, range(16)))
    assert sorted(numbers) == list(range(first.number + 1, first.number + 17))
    bob = submit(sessions, PLAIN, username="bob", enqueue=lambda build_id, queue: None)
    assert bob.number == 1
    rows = worker_env.sql(
        "SELECT b.number, s.name FROM builds b JOIN build_stages s ON s.build_id = b.id"
        " WHERE b.id = :id ORDER BY s.id", id=first.id
    )
    assert rows == [(first.number, f"setup - #{first.number}"), (first.number, "a")]


def test_a_build_gets_the_owners_stored_variables_and_keys_then_its_own_in_order(worker_env, sessions):
    # The namespaces exist once a build named them.
    _submit(sessions, "namespace: team\n" + PLAIN)
    _submit(sessions, "namespace: other\n" + PLAIN)
    ((user_id,),) = worker_env.sql("SELECT id FROM users WHERE username = 'alice'")
    team, other = (worker_env.sql("SELECT id FROM namespaces WHERE path = :p", p=p)[0][0] for p in ("team", "other"))
    stored = CIPHER.encrypt_text("stored-secret")

    def variable(key, value, namespace=None, masked=False):
        return worker_env.sql(
            "INSERT INTO variables (user_id, author_id, namespace_id, key, value, masked)"
            " VALUES (:u, :u, :n, :k, :v, :m) RETURNING id", u=user_id, n=namespace, k=key, v=value, m=masked,
        )[0][0]

    team_var = variable("TEAM", "t", team)
    own_var = variable("OWN", stored, masked=True)
    variable("OTHER", "o", other)  # another namespace's: not this build's
    ((key_id,),) = worker_env.sql(
        "INSERT INTO keys (user_id, author_id, name, key, config) VALUES (:u, :u, 'deploy', :k, 'Host *') RETURNING id",
        u=user_id, k=CIPHER.encrypt(b"stored key"),
    )

    built = _submit(
        sessions,
        "namespace: team\nenv: [FROM_MANIFEST=m]\n" + PLAIN,
        variables=[Variable("GIVEN", "g"), Variable("SECRET", "s3cret", masked=True)],
        keys=[Key("given", "given key", "")],
    )
    rows = worker_env.sql(
        "SELECT variable_id, key, value, masked FROM build_variables WHERE build_id = :id ORDER BY id", id=built.id
    )
    # The stored ones in the order they were stored, copied as stored; then the manifest's and the caller's.
    assert [row[:2] for row in rows] == [
        (team_var, "TEAM"), (own_var, "OWN"), (None, "FROM_MANIFEST"), (None, "GIVEN"), (None, "SECRET"),
    ]
    assert rows[1][2:] == (stored, True)
    assert [row[2:] for row in rows[2:4]] == [("m", False), ("g", False)]
    assert rows[4][3] is True and rows[4][2] != "s3cret" and CIPHER.decrypt_text(rows[4][2]) == "s3cret"

    keys = worker_env.sql(
        "SELECT key_id, name, key, config, location FROM build_keys WHERE build_id = :id ORDER BY id", id=built.id
    )
    assert [(k[0], k[1], k[3], k[4]) for k in keys] == [
        (key_id, "deploy", "Host *", "/root/.ssh/deploy"), (None, "given", "", "/root/.ssh/given"),
    ]
    assert CIPHER.decrypt(bytes(keys[0][2])) == b"stored key" and CIPHER.decrypt(bytes(keys[1][2])) == b"given key"

    # A build outside any namespace gets the owner's own only.
    plain = _submit(sessions)
    assert worker_env.sql("SELECT key FROM build_variables WHERE build_id = :id ORDER BY id", id=plain.id) == [("OWN",)]


def test_the_common_submission_is_three_round_trips_and_a_new_address_goes_the_long_way(worker_env, sessions):
    _submit(sessions)  # alice is new: the long way
    engine = sessions.kw["bind"]
    sent: list[str] = []
    listener = lambda conn, cursor, sql, *rest: sent.append(" ".join(sql.split()[:3]))  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    _submit(sessions)
    assert [s for s in sent if not s.startswith("PREPARE")] == ["BEGIN; SELECT id,", "EXECUTE djinn_insert_build (%(user_id)s,", "COMMIT"]
    sent.clear()
    built = _submit(sessions, email="alice@example.com")
    assert "BEGIN; SELECT id," in sent and any(s.startswith("UPDATE users") for s in sent)  # tried, then the ORM's way
    event.remove(engine, "before_cursor_execute", listener)
    assert worker_env.sql("SELECT email FROM users WHERE username = 'alice'") == [("alice@example.com",)]
    assert worker_env.sql("SELECT count(*) FROM builds WHERE id = :id", id=built.id) == [(1,)]


def test_a_failed_common_submission_rolls_back_and_leaves_its_connection_clean(worker_env, sessions):
    first = _submit(sessions)
    worker_env.sql("ALTER TABLE builds ADD CONSTRAINT test_refuse CHECK (number < 0) NOT VALID")
    with pytest.raises(DBAPIError, match="test_refuse"):
        _submit(sessions)
    # The owner's row is not held by a transaction left open on a pooled connection.
    with create_engine(worker_env.url).connect() as other:
        other.exec_driver_sql("SET lock_timeout = '2s'")
        assert other.exec_driver_sql("SELECT id FROM users WHERE username = 'alice' FOR UPDATE NOWAIT").first() is not None
        other.rollback()
    worker_env.sql("ALTER TABLE builds DROP CONSTRAINT test_refuse")
    second = _submit(sessions)  # the same pool's connections work
    assert second.number == first.number + 1
    assert worker_env.sql("SELECT count(*) FROM builds") == [(2,)]
