"""The build row is the lease: exactly one live worker runs a build (SPEC section 5).

A worker claims a queued build atomically (status, worker, attempt, heartbeat)
and keeps beating while it runs. A build whose heartbeat went stale belongs to a
dead worker: the reaper (djinn.worker.reaper, and only it) resets it to a clean state,
tags it `orphaned` and queues it again, at most MAX_ATTEMPTS times in all.

The guarantees, and what each rests on:
- one run at a time: a claim only takes a `queued` build, in one UPDATE, so any
  number of messages for one build (re-deliveries, reconciliation) start it once;
- a run that may have lost its lease stops itself (fencing, djinn.worker.execute): after
  a beat that matched no row, or after `fence_after` (5/8 of orphan_timeout, on
  the monotonic clock, so a frozen process counts the freeze) without a beat
  that landed. That is 1/8 of orphan_timeout before the reaper may call the
  lease stale (3/4), so the old run is gone before a new one can start;
- nothing a fenced run writes lands: every write of a running build checks the
  lease in the database within its own transaction (`holds`, `guard`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, delete, func, select, update
from sqlalchemy.orm import Session

from djinn.db.engine import rowcount
from djinn.db.models import Build, BuildArtifact, BuildJob, BuildJobOutput, BuildObject, BuildTag
from djinn.runner.store import FileStore
from djinn.status import Status

MAX_ATTEMPTS = 3
ORPHANED_TAG = "orphaned"


@dataclass(frozen=True)
class Lease:
    build_id: int
    worker: str
    attempt: int


def claim(session: Session, build_id: int, worker: str) -> Lease | None:
    """Take the queued build for `worker`, or None when it is finished, missing or running.

    A running build is never taken over here, even with a stale heartbeat: that is
    the reaper's, which waits out database outages first (djinn.worker.reaper), so a worker
    whose beats could not land for a while is not mistaken for a dead one. Runs in
    the caller's transaction; the row lock makes concurrent claims wait for each other.
    """
    # The common case, a queued build, in one statement; the rest takes the row lock below.
    claimed = session.execute(
        update(Build)
        .where(Build.id == build_id, Build.status == Status.QUEUED, Build.attempt < MAX_ATTEMPTS)
        .values(
            status=Status.RUNNING,
            worker=worker,
            attempt=Build.attempt + 1,
            heartbeat_at=func.now(),
            started_at=func.now(),
            error=None,
        )
        .returning(Build.attempt)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed is not None:
        return Lease(build_id, worker, claimed)
    build = session.scalar(select(Build).where(Build.id == build_id).with_for_update())
    if build is None or build.status != Status.QUEUED:
        return None
    if build.attempt >= MAX_ATTEMPTS:
        abandon(session, build, f"the build was started {build.attempt} times and each worker running it died; giving up")
        return None
    build.status = Status.RUNNING
    build.worker = worker
    build.attempt += 1
    build.heartbeat_at = func.now()
    build.started_at = func.now()
    build.error = None
    session.flush()
    return Lease(build.id, worker, build.attempt)


def reset_for_rerun(session: Session, build: Build, artifacts: FileStore | None, *, orphaned: bool = True) -> None:
    """Put a build back to how it was submitted, for another run.

    orphaned: its worker died (the reaper): tagged `orphaned`, the attempt stays
    counted. Otherwise it is a hand-back by a stopping worker: no tag, and the
    attempt the claim counted is given back. Files the run stored (`artifacts`)
    are removed with their rows' results, so the rerun starts clean.
    """
    if artifacts is not None:
        for user_id, hash_ in session.execute(
            select(BuildArtifact.user_id, BuildArtifact.hash).where(BuildArtifact.build_id == build.id)
        ):
            artifacts.remove(user_id, hash_)
    session.execute(delete(BuildJobOutput).where(BuildJobOutput.build_id == build.id))
    session.execute(
        update(BuildJob)
        .where(BuildJob.build_id == build.id)
        .values(status=Status.QUEUED, output=None, started_at=None, finished_at=None)
    )
    session.execute(
        update(BuildArtifact).where(BuildArtifact.build_id == build.id).values(size=None, md5=None, sha256=None)
    )
    session.execute(update(BuildObject).where(BuildObject.build_id == build.id).values(placed=False))
    if orphaned:
        has_tag = session.scalar(select(BuildTag.id).where(BuildTag.build_id == build.id, BuildTag.name == ORPHANED_TAG))
        if has_tag is None:
            session.add(BuildTag(user_id=build.user_id, build_id=build.id, name=ORPHANED_TAG))
    else:
        build.attempt = max(build.attempt - 1, 0)
    build.status = Status.QUEUED
    build.output = None
    build.started_at = None
    build.finished_at = None
    build.worker = None
    build.heartbeat_at = None
    session.flush()


def abandon(session: Session, build: Build, reason: str) -> None:
    """End a build the worker cannot run, saying why, with no job left queued or running."""
    session.execute(
        update(BuildJob)
        .where(BuildJob.build_id == build.id, BuildJob.status.in_([Status.QUEUED, Status.RUNNING]))
        .values(
            status=Status.FAILED,
            started_at=func.coalesce(BuildJob.started_at, func.now()),
            finished_at=func.now(),
        )
    )
    build.status = Status.FAILED
    build.error = reason
    build.output = (build.output or "") + f"djinn: {reason}\n"
    build.started_at = build.started_at or func.now()
    build.finished_at = func.now()
    build.worker = None
    session.flush()


def holds(lease: Lease) -> tuple[ColumnElement[bool], ...]:
    """WHERE conditions true only while `lease` holds its build (with `Build.id == lease.build_id`)."""
    return (Build.worker == lease.worker, Build.attempt == lease.attempt, Build.status == Status.RUNNING)


def beat(session: Session, lease: Lease) -> bool:
    """Refresh the heartbeat; False when the lease was lost (another worker took the build)."""
    result = session.execute(
        update(Build).where(Build.id == lease.build_id, *holds(lease)).values(heartbeat_at=func.now())
    )
    return rowcount(result) == 1


def guard(conn: Connection, lease: Lease) -> bool:
    """Whether `lease` still holds its build, share-locking the row until the transaction ends.

    Taken first in a transaction that writes a running build's rows: the reaper's
    reset waits for that transaction, and once the build was reset or taken over
    nothing more of the old run lands.
    """
    row = conn.execute(
        select(Build.id).where(Build.id == lease.build_id, *holds(lease)).with_for_update(read=True)
    ).first()
    return row is not None


def finished_by(session: Session, lease: Lease, status: Status) -> bool:
    """Whether the build was finished with `status` under `lease`: its final write landed.

    For a final write whose COMMIT was not confirmed (the connection died during
    it): the retry finds the lease gone, and this tells whether it went our way.
    A claim always counts a new attempt and an abandoned build carries an error,
    so nothing else leaves the row like this.
    """
    row = session.execute(
        select(Build.status, Build.attempt, Build.worker, Build.error).where(Build.id == lease.build_id)
    ).first()
    return (
        row is not None
        and row.status == status
        and row.attempt == lease.attempt
        and row.worker is None
        and row.error is None
    )


def held(session: Session, lease: Lease) -> bool:
    """Whether `lease` still holds its build, locking the row for the caller's transaction."""
    row = session.execute(select(Build.id).where(Build.id == lease.build_id, *holds(lease)).with_for_update()).first()
    return row is not None


def orphans(session: Session, stale_after: dt.timedelta, limit: int = 50) -> list[Build]:
    """Running builds whose worker stopped beating, locked for the caller's transaction."""
    return list(
        session.scalars(
            select(Build)
            .where(Build.status == Status.RUNNING, Build.heartbeat_at < func.now() - stale_after)
            .order_by(Build.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
