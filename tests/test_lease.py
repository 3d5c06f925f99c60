"""The lease (djinn.db.lease) between two connections to a real PostgreSQL.

Each race is made to happen, not hoped for: one transaction holds the row, the
other's statement is seen waiting on its lock in pg_stat_activity, then the
first commits. No sleeps.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any, Callable

import pytest
from sqlalchemy import create_engine, event
from waiting import wait_for

from djinn.db import load
from djinn.db.engine import sessions as make_sessions
from djinn.db.engine import transaction
from djinn.db.lease import MAX_ATTEMPTS, ORPHANED_TAG, beat, claim, held, orphans, reset_for_rerun
from djinn.db.load import claim_and_load
from djinn.db.models import Build
from djinn.runner.store import FileStore
from djinn.status import Status

MANIFEST = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"
STALE = dt.timedelta(seconds=30)


@pytest.fixture
def db(worker_env):
    engine = create_engine(worker_env.url)
    yield make_sessions(engine)
    engine.dispose()


def waiting_on_a_lock(worker_env) -> bool:
    rows = worker_env.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
    return rows[0][0] > 0


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def joined(thread: threading.Thread, result: dict[str, Any]) -> Any:
    thread.join(30)
    assert not thread.is_alive(), "the second connection never finished"
    if "error" in result:
        raise result["error"]
    return result["value"]


def row(worker_env, build_id: int) -> tuple:
    return worker_env.sql("SELECT status, worker, attempt FROM builds WHERE id = :id", id=build_id)[0]


def test_two_claims_of_one_build_start_it_once(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as first:
        lease = claim(first, build_id, "w1")
        assert lease is not None and lease.attempt == 1

        def second_claim():
            with transaction(db) as second:
                return claim(second, build_id, "w2")

        thread, result = in_thread(second_claim)
        wait_for(lambda: waiting_on_a_lock(worker_env), 10, "the second claim to wait on the row lock")
    assert joined(thread, result) is None  # it saw the build running once the first committed
    assert row(worker_env, build_id) == ("running", "w1", 1)


def test_a_stale_running_build_is_the_reapers_not_a_claims(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as session:
        assert claim(session, build_id, "dead") is not None
    worker_env.sql("UPDATE builds SET heartbeat_at = now() - interval '1 hour' WHERE id = :id", id=build_id)
    with transaction(db) as session:
        assert claim(session, build_id, "w2") is None
    with transaction(db) as session:
        assert [b.id for b in orphans(session, STALE)] == [build_id]


def test_two_reapers_never_take_the_same_orphan(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as session:
        claim(session, build_id, "dead")
    worker_env.sql("UPDATE builds SET heartbeat_at = now() - interval '1 hour' WHERE id = :id", id=build_id)
    with transaction(db) as first:
        assert [b.id for b in orphans(first, STALE)] == [build_id]
        with transaction(db) as second:  # the row is locked: skipped, not waited for
            assert orphans(second, STALE) == []


def test_reset_puts_an_orphan_back_as_submitted_and_tags_it_once(worker_env, db, tmp_path):
    build_id = worker_env.submit(MANIFEST)
    store = FileStore(str(tmp_path / "artifacts"))
    for _ in range(2):
        with transaction(db) as session:
            lease = claim(session, build_id, "dead")
        assert lease is not None
        worker_env.sql("UPDATE build_jobs SET status = 'running', output = 'half' WHERE build_id = :id", id=build_id)
        with transaction(db) as session:
            build = session.get(Build, build_id)
            assert build is not None
            reset_for_rerun(session, build, store)
    assert row(worker_env, build_id) == ("queued", None, 2)  # both attempts counted
    assert worker_env.sql("SELECT DISTINCT status, output FROM build_jobs WHERE build_id = :id", id=build_id) == [("queued", None)]
    tags = worker_env.sql("SELECT name FROM build_tags WHERE build_id = :id", id=build_id)
    assert tags == [(ORPHANED_TAG,)]


def test_a_hand_back_gives_the_attempt_back_without_a_tag(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as session:
        lease = claim(session, build_id, "stopping")
    assert lease is not None
    with transaction(db) as session:
        assert held(session, lease)
        build = session.get(Build, build_id)
        assert build is not None
        reset_for_rerun(session, build, None, orphaned=False)
    assert row(worker_env, build_id) == ("queued", None, 0)
    assert worker_env.sql("SELECT count(*) FROM build_tags WHERE build_id = :id", id=build_id) == [(0,)]


def test_an_old_lease_cannot_beat_once_the_build_was_taken_over(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as session:
        old = claim(session, build_id, "w1")
    assert old is not None
    with transaction(db) as session:  # the reaper reruns it and another worker claims it
        build = session.get(Build, build_id)
        assert build is not None
        reset_for_rerun(session, build, None)
        new = claim(session, build_id, "w2")
    assert new is not None and new.attempt == 2
    with transaction(db) as session:
        assert beat(session, old) is False
        assert held(session, old) is False
        assert beat(session, new) is True


def test_a_beat_waits_for_a_takeover_in_flight_and_then_finds_its_lease_gone(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as session:
        old = claim(session, build_id, "w1")
    assert old is not None
    with transaction(db) as reaper:
        build = reaper.get(Build, build_id, with_for_update=True)
        assert build is not None

        def old_beat():
            with transaction(db) as session:
                return beat(session, old)

        thread, result = in_thread(old_beat)
        wait_for(lambda: waiting_on_a_lock(worker_env), 10, "the beat to wait on the reaper's row lock")
        reset_for_rerun(reaper, build, None)
    assert joined(thread, result) is False


def test_a_build_started_too_often_is_failed_by_the_claim(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    worker_env.sql("UPDATE builds SET attempt = :n WHERE id = :id", n=MAX_ATTEMPTS, id=build_id)
    with transaction(db) as session:
        assert claim(session, build_id, "w1") is None
    status, error = worker_env.sql("SELECT status, error FROM builds WHERE id = :id", id=build_id)[0]
    assert status == Status.FAILED.value and f"started {MAX_ATTEMPTS} times" in error
    assert worker_env.sql("SELECT DISTINCT status FROM build_jobs WHERE build_id = :id", id=build_id) == [("failed",)]


def test_status_columns_read_back_as_status_members(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with db() as session:
        build = session.get(Build, build_id)
        assert build is not None and build.status is Status.QUEUED
        assert all(job.status is Status.QUEUED for job in build.jobs)


def test_claim_and_load_takes_a_queued_build_and_reads_it_in_one_statement(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    engine = db.kw["bind"]
    statements: list[str] = []
    # A PREPARE (once per connection, djinn.db.prepared) is not a statement of the claim's.
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *rest: None if sql.startswith("PREPARE ") else statements.append(sql))
    with transaction(db) as session:
        claimed = claim_and_load(session, build_id, "w1")
    assert claimed is not None
    lease, loaded = claimed
    assert lease.attempt == 1 and loaded["id"] == build_id
    assert len(statements) == 1 and statements[0].startswith("EXECUTE djinn_claim_and_load ")
    assert row(worker_env, build_id) == ("running", "w1", 1)
    assert [job.commands for stage in load.decode(loaded, None).plan.stages for job in stage.jobs] == [(), ("true",)]  # create-driver, then the job

    statements.clear()
    with transaction(db) as session:
        assert claim_and_load(session, build_id, "w2") is None  # running: not w2's, and left as it was
    assert len(statements) > 1  # took lease.claim's locking path
    assert row(worker_env, build_id) == ("running", "w1", 1)


def test_claim_and_load_of_a_build_out_of_attempts_gives_it_up(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    worker_env.sql("UPDATE builds SET attempt = :n WHERE id = :id", n=MAX_ATTEMPTS, id=build_id)
    with transaction(db) as session:
        assert claim_and_load(session, build_id, "w1") is None
    assert row(worker_env, build_id) == ("failed", None, MAX_ATTEMPTS)


def test_a_claim_and_load_waits_for_a_concurrent_claim_and_then_reads_nothing(worker_env, db):
    build_id = worker_env.submit(MANIFEST)
    with transaction(db) as first:
        assert claim(first, build_id, "w1") is not None

        def second_claim():
            with transaction(db) as second:
                return claim_and_load(second, build_id, "w2")

        thread, result = in_thread(second_claim)
        wait_for(lambda: waiting_on_a_lock(worker_env), 10, "the second claim to wait on the row lock")
    assert joined(thread, result) is None
    assert row(worker_env, build_id) == ("running", "w1", 1)
