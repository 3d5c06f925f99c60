"""Recording a running build in PostgreSQL: job statuses, timestamps, output and artifacts.

Output is appended as rows of `build_job_output` while a job runs (buffered,
written at least every FLUSH_SECONDS so `logs -f` stays live), which keeps the
cost of storing output linear and the worker's memory constant. When a job ends
its chunks are folded into `build_jobs.output`, and when the build ends into
`builds.output`.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import threading
import time
from typing import Any, BinaryIO, Callable, Iterator, cast

from sqlalchemy import Connection, Engine, Table, func, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from djinn.crypto import Hasher, hasher
from djinn.db.engine import autocommit
from djinn.db.lease import Lease, guard
from djinn.db.models import Build, BuildArtifact, BuildJobOutput
from djinn.db.prepared import Prepared
from djinn.errors import DjinnError
from djinn.plan import CREATE_DRIVER, JobPlan
from djinn.runner.engine import Reporter
from djinn.runner.store import FileStore, StoredArtifact
from djinn.status import Status
from djinn.timers import TIMERS, Timer

log = logging.getLogger(__name__)

FLUSH_BYTES = 256 * 1024
FLUSH_SECONDS = 0.25
URGENT_SECONDS = 0.05
# Output waiting for the writer beyond this makes the job wait: memory stays bounded
# whatever a job prints, even while the database is slow.
MAX_PENDING = 8 * 1024 * 1024
RETRY_SECONDS = 1.0
# Output larger than this stays in build_job_output rather than being copied into
# the single text columns (PostgreSQL cannot hold a value over 1 GB in a column).
COLUMN_LIMIT = 256 * 1024 * 1024


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


#: PostgreSQL NOTIFY channel told each finished build's id when its rows are final,
#: so a client can wait for a build (LISTEN) instead of polling.
FINISHED_CHANNEL = "djinn_build_finished"

_OUTPUT = cast(Table, BuildJobOutput.__table__)

# The writes below run several times a build: plain SQL, one statement shape each,
# so no statement is built or compiled per call.

# A job's changes in a batch. started_at: when it started, else the one stored (a
# job that never ran keeps none, as the Go worker leaves it). With :fold, its chunks
# become `output` (read through the (build_id, id) index); a job that never ran gets
# an empty output, as on the Go worker.
UPDATE_JOB = text(
    """
    UPDATE build_jobs SET
      status = :status,
      started_at = COALESCE(:started_at, started_at),
      finished_at = :finished_at,
      output = CASE WHEN :fold THEN
        (SELECT COALESCE(string_agg(o.data, '' ORDER BY o.id), '') FROM build_job_output o
          WHERE o.build_id = :build_id AND o.job_id = :job_id)
        WHEN :skipped THEN COALESCE(output, '')
        ELSE output END
    WHERE id = :job_id
    """
)

# The build's final row, only while the lease holds (the caller rolls back when no
# row comes back). The chunks are folded into `output` and deleted in the same
# statement: every part of it reads the snapshot from before the DELETE. The
# build's objects are marked placed when the driver got them. The NOTIFY is
# delivered when the transaction commits.
FINISH_BUILD = text(
    f"""
    WITH folded AS (DELETE FROM build_job_output WHERE build_id = :id AND :fold),
      placed AS (UPDATE build_objects SET placed = true WHERE build_id = :id AND :objects_placed)
    UPDATE builds SET
      status = :status,
      finished_at = now(),
      worker = NULL,
      output = CASE WHEN :fold THEN
        (SELECT COALESCE(string_agg(o.data, '' ORDER BY o.id), '') FROM build_job_output o WHERE o.build_id = :id)
        ELSE output END
    WHERE id = :id AND worker = :worker AND attempt = :attempt AND status = 'running'
    RETURNING pg_notify('{FINISHED_CHANNEL}', CAST(:id AS text))
    """
)


# FINISH_BUILD for a build none of whose output was written yet (a short build: the
# writer thread had nothing worth a transaction before the end): every job's final
# row and the build's, from memory, in one statement. Every write hangs on the
# lease-checked UPDATE of the build (`held`), so when the lease is gone the statement
# writes nothing: atomic by itself, it can run in autocommit, one round trip.
FINISH_FROM_MEMORY = Prepared(
    "djinn_finish_from_memory",
    text(
    f"""
    WITH held AS (
      UPDATE builds SET status = :status, finished_at = now(), worker = NULL, output = :output
      WHERE id = :id AND worker = :worker AND attempt = :attempt AND status = 'running'
      RETURNING id
    ),
    jobs AS (
      SELECT * FROM json_to_recordset(CAST(:jobs AS json))
        AS j(id bigint, status text, started_at timestamptz, finished_at timestamptz, output text, ran boolean, finished boolean)
    ),
    job_rows AS (
      UPDATE build_jobs b SET
        status = CAST(j.status AS status),
        started_at = COALESCE(j.started_at, b.started_at),
        finished_at = j.finished_at,
        output = CASE WHEN j.finished AND j.ran THEN j.output WHEN j.finished THEN COALESCE(b.output, '') ELSE b.output END
      FROM jobs j, held WHERE b.id = j.id AND b.build_id = held.id
    ),
    placed AS (UPDATE build_objects o SET placed = true FROM held WHERE o.build_id = held.id AND :objects_placed)
    SELECT pg_notify('{FINISHED_CHANNEL}', CAST(held.id AS text)) FROM held
    """
    ),
)


class DatabaseReporter(Reporter):
    """Keeps the build's rows up to date as the runner reports, without making it wait.

    Everything the runner reports is queued and written by one thread per build,
    each batch in one transaction, so a job never waits on a database round trip
    (unless MAX_PENDING output is waiting). Writes that fail are kept and retried.
    What is still queued when the build ends goes into the caller's final
    transaction (`finish`): a short build costs that one write, and a build that
    ends while PostgreSQL is away does not wait for it before its final write.

    Fenced writes: with a `lease`, every batch first checks in the database that
    the lease still holds (`djinn.db.lease.guard`), and `allowed()` is asked before
    each one; once either says no, nothing more is written.
    """

    def __init__(
        self,
        engine: Engine,
        build_id: int,
        job_ids: dict[tuple[str, str], int],
        allowed: Callable[[], bool] = lambda: True,
        lease: Lease | None = None,
    ) -> None:
        self.engine = engine
        self.build_id = build_id
        self.job_ids = job_ids
        self.allowed = allowed
        self.lease = lease
        #: The database said the lease is gone: nothing more is written.
        self.fenced = False
        self.final: Status | None = None
        self.objects_placed = False
        #: Characters of output stored per job id.
        self.sizes: dict[int, int] = {}
        self._ops: list[list[Any]] = []
        self._pending = 0
        self._urgent_at: float | None = None
        self._stopping = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._decoding: int | None = None
        self._cond = threading.Condition()
        # Started when there is something to write and the build still runs URGENT_SECONDS later:
        # a short build's reports all go into its final write, with no thread for them.
        self._thread: threading.Thread | None = None
        self._wake: Timer | None = None

    def _job_id(self, job: JobPlan) -> int:
        # Keyed by the plan's job objects themselves: two jobs may be equal in every field.
        return self.job_ids[job.key]

    # -- what the runner reports ------------------------------------------------

    def job_started(self, job: JobPlan) -> None:
        self._queue(["start", self._job_id(job), _now()], urgent=True)

    def job_output(self, job: JobPlan, data: bytes) -> None:
        job_id = self._job_id(job)
        with self._cond:
            if self._decoding != job_id:
                self._end_decoding()
                self._decoding = job_id
            chunk = self._decoder.decode(data)
            if not chunk:
                return
            last = self._ops[-1] if self._ops else None
            if last is not None and last[0] == "output" and last[1] == job_id:
                last[2].append(chunk)
            else:
                self._ops.append(["output", job_id, [chunk]])
            self._pending += len(chunk)
            if self._pending >= FLUSH_BYTES:
                self._start_writer()  # enough to write now
                self._cond.notify_all()
            elif len(self._ops) == 1:
                self._wake_writer()
                self._cond.notify_all()  # the writer starts its FLUSH_SECONDS
            while self._pending > MAX_PENDING and self._thread is not None and self._thread.is_alive():
                self._cond.wait(1)

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        if job.name == CREATE_DRIVER and ran and status is Status.PASSED:
            self.objects_placed = True
        with self._cond:
            self._end_decoding()
        self._queue(["finish", self._job_id(job), status, _now(), ran], urgent=True)

    def build_finished(self, status: Status) -> None:
        """Stop the writer thread; what it has not written yet goes into `finish`'s transaction."""
        self.final = status
        with self._cond:
            self._end_decoding()
            self._stopping = True
            if self._wake is not None:
                self._wake.cancel()
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def finish(self, conn: Connection, status: Status, lease: Lease) -> bool:
        """The build's final write, in the caller's transaction, if `lease` still holds the build.

        Returns False (having written nothing the caller should keep: roll back) when
        another worker owns the build. The lease is checked by the UPDATE itself, which
        also locks the row until the transaction ends.
        """
        # Nothing here changes the reporter, so a caller may run it again in a new
        # transaction when the first one failed (a lost connection).
        from_memory = self._from_memory(status, lease)
        if from_memory is not None:
            return FINISH_FROM_MEMORY.execute(conn, from_memory).first() is not None
        sizes = self._write_ops(conn, self._ops)
        params = {
            "id": self.build_id,
            "status": status.value,
            "worker": lease.worker,
            "attempt": lease.attempt,
            "fold": sum(sizes.values()) <= COLUMN_LIMIT,
            "objects_placed": self.objects_placed,
        }
        return conn.execute(FINISH_BUILD, params).first() is not None

    def finish_alone(self, status: Status, lease: Lease) -> bool | None:
        """`finish` as one statement in autocommit, when the reports all fit in it; None when they do not.

        A short build's final write is then one round trip instead of three (BEGIN,
        the statement, COMMIT). Like `finish`, it may be run again after a failure.
        """
        from_memory = self._from_memory(status, lease)
        if from_memory is None:
            return None
        with autocommit(self.engine) as conn:
            return FINISH_FROM_MEMORY.execute(conn, from_memory).first() is not None

    def _from_memory(self, status: Status, lease: Lease) -> dict[str, Any] | None:
        """FINISH_FROM_MEMORY's parameters from the reports still queued; None when they are too big
        for it, or when part of the output is written already.

        The jobs' rows change as UPDATE_JOB would change them for the same reports.
        """
        if self.sizes:
            return None
        jobs: dict[int, dict[str, Any]] = {}
        chunks: dict[int, list[str]] = {}
        output: list[str] = []
        for op in self._ops:
            kind, job_id = op[0], op[1]
            if kind == "output":
                chunks.setdefault(job_id, []).extend(op[2])
                output.extend(op[2])
                continue
            job = jobs.setdefault(job_id, {"id": job_id, "status": Status.RUNNING.value, "started_at": None,
                                           "finished_at": None, "output": None, "ran": False, "finished": False})
            if kind == "start":
                job["started_at"] = op[2].isoformat()
            else:
                finished_status, finished_at, ran = op[2:]
                job.update(status=finished_status.value, finished_at=finished_at.isoformat(), ran=ran, finished=True)
        build_output = "".join(output)
        if len(build_output) > COLUMN_LIMIT:
            return None
        for job_id, job in jobs.items():
            job["output"] = "".join(chunks.get(job_id, ()))
        return {
            "jobs": json.dumps(list(jobs.values())),
            "id": self.build_id,
            "status": status.value,
            "worker": lease.worker,
            "attempt": lease.attempt,
            "output": build_output,
            "objects_placed": self.objects_placed,
        }

    # -- the writer thread ------------------------------------------------------

    def _wake_writer(self) -> None:
        """Have the writer started URGENT_SECONDS from now, the soonest it writes anything (under _cond)."""
        if self._thread is None and self._wake is None:
            self._wake = TIMERS.call_later(URGENT_SECONDS, self._start_writer)

    def _start_writer(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._write_loop, name=f"recorder-{self.build_id}", daemon=True)
                self._thread.start()

    def _queue(self, op: list[Any], urgent: bool = False) -> None:
        with self._cond:
            self._wake_writer()
            self._ops.append(op)
            if urgent and self._urgent_at is None:
                self._urgent_at = time.monotonic()
            self._cond.notify_all()

    def _end_decoding(self) -> None:
        """Flush the decoder's held bytes (a split UTF-8 sequence) into the job's output."""
        if self._decoding is None:
            return
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        if tail:
            self._ops.append(["output", self._decoding, [tail]])
            self._pending += len(tail)
        self._decoding = None

    def _write_loop(self) -> None:
        while (ops := self._next_batch()) is not None:
            try:
                self._write(ops)
            except Exception as exc:  # the database may be restarting: the batch goes back, to be tried again
                log.warning("build %s: recording failed, trying again: %s", self.build_id, exc)
                with self._cond:
                    self._ops[:0] = ops  # ahead of what came since; finish() writes it if the build ends first
                    deadline = time.monotonic() + RETRY_SECONDS
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                continue
            with self._cond:
                self._pending -= sum(len(c) for op in ops if op[0] == "output" for c in op[2])
                self._cond.notify_all()

    def _next_batch(self) -> list[list[Any]] | None:
        """Wait for a batch worth a transaction; None once the build is over.

        Output waits up to FLUSH_SECONDS to be written, a job starting or ending
        URGENT_SECONDS: long enough that a short build's reports all go into its
        final transaction, short enough that `status` and `logs -f` look live.
        """
        with self._cond:
            while not self._ops and not self._stopping:
                self._cond.wait()
            deadline = time.monotonic() + FLUSH_SECONDS
            while not self._stopping and self._pending < FLUSH_BYTES:
                if self._urgent_at is not None:
                    deadline = min(deadline, self._urgent_at + URGENT_SECONDS)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None  # the rest is written by finish(), in the build's final transaction
            ops, self._ops = self._ops, []
            self._urgent_at = None
            return ops

    def _write(self, ops: list[list[Any]]) -> None:
        if self.fenced or not self.allowed():
            return
        with self.engine.begin() as conn:
            if self.lease is not None and not guard(conn, self.lease):
                self.fenced = True
                log.error("build %s: the lease is gone: this run's output is no longer recorded", self.build_id)
                return
            sizes = self._write_ops(conn, ops)
        self.sizes = sizes

    def _write_ops(self, conn: Connection, ops: list[list[Any]]) -> dict[int, int]:
        """Write a batch: all its output in one INSERT, then one UPDATE per job it touches.

        Returns the characters of output stored per job once the batch is committed.
        """
        chunks: list[dict[str, Any]] = []
        changes: dict[int, dict[str, Any]] = {}  # job id -> what happened to it in this batch, in order
        sizes = dict(self.sizes)
        for op in ops:
            kind, job_id = op[0], op[1]
            if kind == "output":
                data = "".join(op[2])
                chunks.append({"build_id": self.build_id, "job_id": job_id, "data": data})
                sizes[job_id] = sizes.get(job_id, 0) + len(data)
            elif kind == "start":
                changes.setdefault(job_id, {})["started_at"] = op[2]
            else:
                changes.setdefault(job_id, {})["finished"] = op[2:]
        if chunks:
            conn.execute(insert(_OUTPUT), chunks)
        if changes:
            conn.execute(UPDATE_JOB, [self._job_params(job_id, change, sizes) for job_id, change in changes.items()])
        return sizes

    def _job_params(self, job_id: int, change: dict[str, Any], sizes: dict[int, int]) -> dict[str, Any]:
        params = {"build_id": self.build_id, "job_id": job_id, "started_at": change.get("started_at")}
        if "finished" not in change:
            return {**params, "status": Status.RUNNING.value, "finished_at": None, "fold": False, "skipped": False}
        status, finished_at, ran = change["finished"]
        fold = ran and sizes.get(job_id, 0) <= COLUMN_LIMIT
        return {**params, "status": status.value, "finished_at": finished_at, "fold": fold, "skipped": not ran}


class BuildArtifacts:
    """The runner's ArtifactStore for one build: files in the artifact store, rows in build_artifacts."""

    def __init__(
        self,
        engine: Engine,
        build_id: int,
        user_id: int,
        job_ids: dict[tuple[str, str], int],
        files: FileStore,
        hashes: Hasher | None = None,
        lease: Lease | None = None,
        allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.hashes = hashes or hasher(None)
        self.engine = engine
        self.build_id = build_id
        self.user_id = user_id
        self.job_ids = job_ids
        self.files = files
        self.lease = lease
        self.allowed = allowed

    def _check_lease(self, conn: Connection) -> None:
        if not self.allowed() or (self.lease is not None and not guard(conn, self.lease)):
            raise DjinnError("the build's lease is gone: artifact not stored")

    def store(self, job: JobPlan, name: str, data: BinaryIO) -> StoredArtifact:
        job_id = self.job_ids[job.key]
        with self.engine.begin() as conn:
            self._check_lease(conn)
            row = conn.execute(
                select(BuildArtifact.id, BuildArtifact.hash).where(BuildArtifact.job_id == job_id, BuildArtifact.name == name)
            ).first()
            if row is None:
                hash_ = self.hashes.hash_now()  # an artifact the server did not list: named the server's way
                artifact_id = conn.execute(
                    insert(BuildArtifact)
                    .values(user_id=self.user_id, build_id=self.build_id, job_id=job_id, hash=hash_, source=name, name=name)
                    .returning(BuildArtifact.id)
                ).scalar_one()
            else:
                artifact_id, hash_ = row
        if not self.allowed():
            raise DjinnError("the build's lease is gone: artifact not stored")
        stored = self.files.write(self.user_id, hash_, data)
        with self.engine.begin() as conn:
            self._check_lease(conn)
            conn.execute(
                update(BuildArtifact)
                .where(BuildArtifact.id == artifact_id)
                .values(size=stored.size, md5=bytes.fromhex(stored.md5), sha256=bytes.fromhex(stored.sha256))
            )
        return StoredArtifact(name, stored.size, stored.md5, stored.sha256, stored.truncated)


def stream_output(sessions: sessionmaker[Session], build_id: int, follow: bool = False, poll: float = 0.2) -> Iterator[str]:
    """A build's output, in order. With `follow`, waits for more until the build finishes.

    While a build runs its output is in build_job_output; once it ends it is moved to
    builds.output (unless too large for the column). Reading keeps a character offset
    so the switch from one to the other neither repeats nor skips anything.
    """
    last_id = 0
    sent = 0
    while True:
        with sessions() as session:
            row = session.execute(
                select(Build.status, Build.output.is_not(None).label("has_output")).where(Build.id == build_id)
            ).one_or_none()
            if row is None:
                raise DjinnError(f"no build with id {build_id}")
            chunks = session.execute(
                select(BuildJobOutput.id, BuildJobOutput.data)
                .where(BuildJobOutput.build_id == build_id, BuildJobOutput.id > last_id)
                .order_by(BuildJobOutput.id)
                .limit(500)
            ).all()
            if chunks:
                for chunk_id, data in chunks:
                    last_id = chunk_id
                    sent += len(data)
                    yield data
                continue
            if row.status not in (Status.QUEUED.value, Status.RUNNING.value):
                # The chunks may have been folded into builds.output since the last read.
                if row.has_output:
                    rest = session.scalar(select(func.substr(Build.output, sent + 1)).where(Build.id == build_id))
                    if rest:
                        yield rest
                return
            if not follow:
                return
        time.sleep(poll)
