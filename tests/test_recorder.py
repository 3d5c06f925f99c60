"""DatabaseReporter against a real PostgreSQL: live job rows, the final write under the lease."""

from __future__ import annotations

import select
import time

import pytest
from sqlalchemy import create_engine, event
from waiting import wait_for

from djinn.db import load
from djinn.db.engine import sessions as make_sessions
from djinn.db.engine import transaction
from djinn.db.lease import claim
from djinn.db.recorder import FINISHED_CHANNEL, DatabaseReporter
from djinn.plan import JobPlan
from djinn.status import Status

MANIFEST = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"


@pytest.fixture
def claimed(worker_env):
    """A submitted build claimed by worker 'w1', and a reporter for its job `a.1`."""
    build_id = worker_env.submit(MANIFEST)
    engine = create_engine(worker_env.url)
    with transaction(make_sessions(engine)) as session:
        lease = claim(session, build_id, "w1")
    ((job_row,),) = worker_env.sql("SELECT id FROM build_jobs WHERE build_id = :id AND name = 'a.1'", id=build_id)
    job = JobPlan("a", "a.1", ("true",))
    reporter = DatabaseReporter(engine, build_id, {job.key: job_row})
    yield build_id, lease, reporter, job, engine
    engine.dispose()


def job_row(worker_env, build_id):
    return worker_env.sql("SELECT status, output FROM build_jobs WHERE build_id = :id AND name = 'a.1'", id=build_id)[0]


def test_job_rows_are_live_while_the_build_runs(worker_env, claimed):
    build_id, lease, reporter, job, engine = claimed
    reporter.job_started(job)
    reporter.job_output(job, b"hello\n")
    deadline = time.monotonic() + 2
    while job_row(worker_env, build_id)[0] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job_row(worker_env, build_id)[0] == "running"
    while not worker_env.sql("SELECT data FROM build_job_output WHERE build_id = :id", id=build_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker_env.sql("SELECT data FROM build_job_output WHERE build_id = :id", id=build_id) == [("hello\n",)]
    reporter.job_finished(job, Status.PASSED, ran=True)
    reporter.build_finished(Status.PASSED)
    with engine.begin() as conn:
        assert reporter.finish(conn, Status.PASSED, lease)
    assert job_row(worker_env, build_id) == ("passed", "hello\n")


def test_final_write_folds_output_and_announces_the_build(worker_env, claimed):
    build_id, lease, reporter, job, engine = claimed
    pooled = engine.raw_connection()
    pooled.detach()  # a connection of its own, never handed back to the pool
    listener = pooled.dbapi_connection
    listener.autocommit = True
    listener.cursor().execute(f"LISTEN {FINISHED_CHANNEL}")

    # A short build: everything reported goes into the final transaction.
    reporter.job_started(job)
    reporter.job_output(job, b"one\n")
    reporter.job_output(job, b"two\n")
    reporter.job_finished(job, Status.PASSED, ran=True)
    reporter.build_finished(Status.PASSED)
    with engine.begin() as conn:
        assert reporter.finish(conn, Status.PASSED, lease)
        listener.poll()
        assert listener.notifies == []  # told only once the rows are committed

    assert select.select([listener], [], [], 5)[0]
    listener.poll()
    assert [n.payload for n in listener.notifies] == [str(build_id)]
    assert job_row(worker_env, build_id) == ("passed", "one\ntwo\n")
    assert worker_env.sql("SELECT status, output, worker FROM builds WHERE id = :id", id=build_id) == [("passed", "one\ntwo\n", None)]
    assert worker_env.sql("SELECT count(*) FROM build_job_output WHERE build_id = :id", id=build_id) == [(0,)]
    listener.close()


def test_final_write_refused_once_another_worker_holds_the_build(worker_env, claimed):
    build_id, lease, reporter, job, engine = claimed
    reporter.job_started(job)
    reporter.job_output(job, b"late\n")
    reporter.job_finished(job, Status.PASSED, ran=True)
    reporter.build_finished(Status.PASSED)
    # The build was reset and taken by another worker meanwhile (attempt 2).
    worker_env.sql("UPDATE builds SET worker = 'w2', attempt = 2 WHERE id = :id", id=build_id)
    with engine.connect() as conn:
        assert reporter.finish(conn, Status.PASSED, lease) is False
        conn.rollback()
    assert worker_env.sql("SELECT status, worker, output FROM builds WHERE id = :id", id=build_id) == [("running", "w2", None)]


def test_final_write_can_be_run_again_after_a_failed_transaction(worker_env, claimed):
    """What execute relies on to retry the final write on a new connection."""
    build_id, lease, reporter, job, engine = claimed
    reporter.job_output(job, b"kept\n")
    reporter.job_finished(job, Status.FAILED, ran=True)
    reporter.build_finished(Status.FAILED)
    with engine.connect() as conn:
        assert reporter.finish(conn, Status.FAILED, lease)
        conn.rollback()  # the commit never happened
    with engine.begin() as conn:
        assert reporter.finish(conn, Status.FAILED, lease)
    assert worker_env.sql("SELECT status, output FROM builds WHERE id = :id", id=build_id) == [("failed", "kept\n")]
    assert job_row(worker_env, build_id) == ("failed", "kept\n")


def _report(reporter, job, pieces, wait_written=None):
    reporter.job_started(job)
    for piece in pieces:
        reporter.job_output(job, piece)
    if wait_written is not None:
        wait_written()
    reporter.job_finished(job, Status.FAILED, ran=True)
    reporter.build_finished(Status.FAILED)


def _runs(statements):
    """The statements sent, by their first two words; a PREPARE (once per connection) is not a run."""
    return [" ".join(sql.split()[:2]) if sql != "COMMIT" else sql for sql in statements if not sql.startswith("PREPARE ")]


def _rows(worker_env, build_id):
    job = worker_env.sql(
        "SELECT status, output, started_at IS NOT NULL, finished_at IS NOT NULL FROM build_jobs WHERE build_id = :id AND name = 'a.1'",
        id=build_id,
    )
    build = worker_env.sql("SELECT status, output, worker, finished_at IS NOT NULL FROM builds WHERE id = :id", id=build_id)
    return job, build


def test_a_short_builds_final_write_is_one_statement_with_the_rows_the_batched_path_writes(worker_env, claimed):
    pieces = [b"caf\xc3", b"\xa9 one\n", b"two\n"]  # a UTF-8 sequence split across reports
    # Batched: the writer thread has written the output before the end.
    build_id, lease, reporter, job, engine = claimed
    _report(reporter, job, pieces, wait_written=lambda: wait_for(
        lambda: worker_env.sql("SELECT count(*) FROM build_job_output WHERE build_id = :id", id=build_id)[0][0] > 0, 10, "the output written"))
    with engine.begin() as conn:
        assert reporter.finish(conn, Status.FAILED, lease)
    batched = _rows(worker_env, build_id)

    # From memory: nothing written before the end; one statement writes every row.
    other = worker_env.submit(MANIFEST)
    with transaction(make_sessions(engine)) as session:
        other_lease = claim(session, other, "w1")
    ((other_job,),) = worker_env.sql("SELECT id FROM build_jobs WHERE build_id = :id AND name = 'a.1'", id=other)
    memory_reporter = DatabaseReporter(engine, other, {job.key: other_job})
    _report(memory_reporter, job, pieces)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql))
    with engine.begin() as conn:
        assert memory_reporter.finish(conn, Status.FAILED, other_lease)
    assert _runs(statements) == ["EXECUTE djinn_finish_from_memory"]
    assert _rows(worker_env, other) == batched
    assert batched[0] == [("failed", "café one\ntwo\n", True, True)]
    assert batched[1] == [("failed", "café one\ntwo\n", None, True)]



def test_a_short_builds_final_write_alone_is_one_round_trip_that_writes_nothing_once_the_lease_is_gone(worker_env, claimed):
    build_id, lease, reporter, job, engine = claimed
    other = worker_env.submit(MANIFEST)
    with transaction(make_sessions(engine)) as session:
        other_lease = claim(session, other, "w1")
    ((other_job,),) = worker_env.sql("SELECT id FROM build_jobs WHERE build_id = :id AND name = 'a.1'", id=other)
    held = DatabaseReporter(engine, other, {job.key: other_job})
    for each in (reporter, held):
        _report(each, job, [b"out\n"])

    # Taken over by another worker (attempt 2): no row of the build changes, not even its jobs'.
    worker_env.sql("UPDATE builds SET worker = 'w2', attempt = 2 WHERE id = :id", id=build_id)
    before = _rows(worker_env, build_id)
    assert reporter.finish_alone(Status.FAILED, lease) is False
    assert _rows(worker_env, build_id) == before
    assert before[0] == [("queued", None, False, False)]

    # Held: one statement, no BEGIN or COMMIT around it, and every row written.
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: sent.append(sql))
    event.listen(engine, "commit", lambda conn: sent.append("COMMIT"))
    assert held.finish_alone(Status.FAILED, other_lease) is True
    assert _runs(sent) == ["EXECUTE djinn_finish_from_memory"]
    assert _rows(worker_env, other) == ([("failed", "out\n", True, True)], [("failed", "out\n", None, True)])


def test_the_hot_statements_are_prepared_once_per_connection(worker_env, claimed):
    """PostgreSQL plans them once per connection: a later run is an EXECUTE alone, also after a rollback."""
    build_id, lease, reporter, job, engine = claimed
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        load.claim_queued(conn, build_id, "w1")  # the PREPARE, in a transaction that is rolled back
        conn.rollback()
        assert conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars().all() == ["djinn_claim_and_load"]
        sent: list[str] = []
        event.listen(conn, "before_cursor_execute", lambda c, cursor, sql, *rest: sent.append(sql))
        for _ in range(3):
            assert load.claim_queued(conn, build_id, "w1") is None  # claimed by the fixture: nothing to claim
        assert [" ".join(sql.split()[:2]) for sql in sent] == ["EXECUTE djinn_claim_and_load"] * 3
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
    # A new connection prepares it again.
    engine.dispose()
    with engine.connect() as conn:
        assert load.claim_queued(conn, build_id, "w1") is None
        assert conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars().all() == ["djinn_claim_and_load"]
