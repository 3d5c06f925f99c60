"""The build row is the lease: exactly one live worker runs a build (SPEC section 5).

A worker claims a queued build atomically (status, worker, attempt, heartbeat)
and keeps beating while it runs. A build whose heartbeat went stale belongs to a
dead worker: the reaper (djinn.worker.reaper, and only it) resets it to a clean state,
tags it `orphaned` and queues it again, at most MAX_ATTEMPTS times in all.

The guarantees, and what each rests on:
- one run at a time: a claim only takes a `queued` build, in one UPDATE, so any
  number of messages for one build (re-deliveries, reconciliation) start it once;
- a run that may have lost its lease stops itself (fencing, `Heartbeat`): after
  a beat that matched no row, or after `fence_after` (5/8 of orphan_timeout, on
  the monotonic clock, so a frozen process counts the freeze) without a beat
  that landed. That is 1/8 of orphan_timeout before the reaper may call the
  lease stale (3/4), so the old run is gone before a new one can start;
- nothing a fenced run writes lands: every write of a running build checks the
  lease in the database within its own transaction (`holds`, `guard`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import ColumnElement, Connection, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from djinn.db.engine import rowcount, transaction
from djinn.db.models import Build, BuildArtifact, BuildJob, BuildJobOutput, BuildObject, BuildTag
from djinn.runner.store import FileStore
from djinn.status import Status
from djinn.timers import TIMERS, Timer

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
ORPHANED_TAG = "orphaned"
#: How soon a beat that failed is tried again.
BEAT_RETRY_SECONDS = 0.5


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


class Heartbeat:
    """Keeps the lease fresh, and fences the run the moment the lease may be gone.

    The beats run on a thread of the build's own (a database call may block for
    seconds), started when the first beat is due: a build shorter than one interval
    never starts it. The watch is a timer (djinn.timers) set for when the lease
    would become doubtful, `fence_after` past the last beat that landed, so a run
    stops on time, also right after the whole process tree was frozen and resumed.
    Once the build's jobs are over (`finishing`), the clock no longer fences: the
    beats go on and the final write checks the lease in the database itself.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        lease: Lease,
        claimed_at: float,
        on_fenced: Callable[[], None],
        *,
        interval: float,
        fence_after: float,
    ) -> None:
        self.sessions = sessions
        self.lease = lease
        self.on_fenced = on_fenced
        self.interval = interval
        self.fence_after = fence_after
        #: The run was stopped because its lease was lost or doubtful.
        self.fenced = False
        #: A beat matched no row: the build was taken over (or our final write landed).
        self.gone = False
        self._last_ok = claimed_at  # monotonic time just before the last beat (or the claim) that landed was sent
        self._finishing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self._first_beat: Timer | None = None
        self._watch_timer: Timer | None = None

    def start(self) -> "Heartbeat":
        with self._lock:
            self._first_beat = TIMERS.call_at(self._last_ok + self.interval, self._start_beats)
            self._watch_timer = TIMERS.call_at(self._last_ok + self.fence_after, self._watch)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for timer in (self._first_beat, self._watch_timer):
                if timer is not None:
                    timer.cancel()
            beats = self._beats
        if beats is not None and beats.is_alive() and beats is not threading.current_thread():
            beats.join(10)

    def finishing(self) -> None:
        """No job runs any more: from now on only a beat that matched no row ends the lease."""
        with self._lock:
            self._finishing = True

    def valid(self) -> bool:
        """Whether this run may still write: not fenced, and a beat landed within `fence_after`."""
        with self._lock:
            if self.fenced or self.gone:
                return False
            return self._finishing or time.monotonic() - self._last_ok < self.fence_after

    def _fence(self, reason: str) -> None:
        with self._lock:
            if self.fenced or self._finishing:
                return
            self.fenced = True
        log.error("build %s: %s; stopping this run and writing nothing more", self.lease.build_id, reason)
        self.on_fenced()

    def _start_beats(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._beats = threading.Thread(target=self._beat_loop, name=f"heartbeat-build-{self.lease.build_id}", daemon=True)
            self._beats.start()

    def _watch(self) -> None:
        """On the timers thread: fence when no beat landed for `fence_after`, else look again when that could be."""
        with self._lock:
            if self._stop.is_set() or self.fenced or self._finishing:
                return
            silent = time.monotonic() - self._last_ok
            if silent < self.fence_after:
                self._watch_timer = TIMERS.call_at(self._last_ok + self.fence_after, self._watch)
                return
        # Fencing stops the driver, which may take a while: not on the timers thread.
        reason = f"no heartbeat landed for {silent:.1f}s, the lease may be taken over"
        threading.Thread(target=self._fence, args=(reason,), name=f"fence-build-{self.lease.build_id}", daemon=True).start()

    def _beat_loop(self) -> None:
        next_at = self._last_ok + self.interval
        failures = 0
        while not self._stop.wait(max(next_at - time.monotonic(), 0.0)):
            if self.fenced:
                return
            sent = time.monotonic()
            try:
                with transaction(self.sessions) as session:
                    alive = beat(session, self.lease)
            except Exception as exc:  # PostgreSQL away: try again soon; the watch fences if it lasts
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("build %s: heartbeat failed (%s); trying again", self.lease.build_id, exc)
                next_at = time.monotonic() + min(BEAT_RETRY_SECONDS, self.interval)
                continue
            if not alive:
                with self._lock:
                    self.gone = True
                self._fence("lease lost: another worker took the build over")
                return
            failures = 0
            with self._lock:
                self._last_ok = max(self._last_ok, sent)
            next_at = sent + self.interval
