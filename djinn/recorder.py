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
import logging
import secrets
import threading
import time
from typing import Any, BinaryIO, Callable, Iterator

from sqlalchemy import Engine, delete, func, insert, select, text, update

from djinn.errors import DjinnError
from djinn.models import Build, BuildArtifact, BuildJob, BuildJobOutput, BuildObject
from djinn.plan import CREATE_DRIVER, JobPlan
from djinn.runner import Reporter
from djinn.status import Status
from djinn.store import FileStore, StoredArtifact

log = logging.getLogger(__name__)

FLUSH_BYTES = 256 * 1024
FLUSH_SECONDS = 0.25
# Output waiting for the writer beyond this makes the job wait: memory stays bounded
# whatever a job prints, even while the database is slow.
MAX_PENDING = 8 * 1024 * 1024
RETRY_SECONDS = 1.0
# Output larger than this stays in build_job_output rather than being copied into
# the single text columns (PostgreSQL cannot hold a value over 1 GB in a column).
COLUMN_LIMIT = 256 * 1024 * 1024


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _folded_output(where) -> Any:
    """The chunks matching `where`, concatenated in order, computed by the database."""
    return (
        select(func.coalesce(func.string_agg(BuildJobOutput.data, text("'' ORDER BY build_job_output.id")), ""))
        .where(where)
        .scalar_subquery()
    )


class DatabaseReporter(Reporter):
    """Keeps the build's rows up to date as the runner reports, without making it wait.

    Everything the runner reports is queued and written by one thread per build,
    each batch in one transaction, so a job never waits on a database round trip
    (unless MAX_PENDING output is waiting). Writes that fail are kept and retried.
    """

    def __init__(
        self,
        engine: Engine,
        build_id: int,
        job_ids: dict[int, int],
        allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.engine = engine
        self.build_id = build_id
        self.job_ids = job_ids
        self.allowed = allowed
        self.final: Status | None = None
        self.objects_placed = False
        #: Characters of output stored per job id.
        self.sizes: dict[int, int] = {}
        self._ops: list[list[Any]] = []
        self._pending = 0
        self._urgent = False
        self._stopping = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._decoding: int | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name=f"recorder-{build_id}", daemon=True)
        self._thread.start()

    def _job_id(self, job: JobPlan) -> int:
        # Keyed by the plan's job objects themselves: two jobs may be equal in every field.
        return self.job_ids[id(job)]

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
                self._cond.notify_all()
            while self._pending > MAX_PENDING and self._thread.is_alive():
                self._cond.wait(1)

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        if job.name == CREATE_DRIVER and ran and status is Status.PASSED:
            self.objects_placed = True
        with self._cond:
            self._end_decoding()
        self._queue(["finish", self._job_id(job), status, _now(), ran], urgent=True)

    def build_finished(self, status: Status) -> None:
        """Wait until everything reported is written; `finish` then makes the final write."""
        self.final = status
        with self._cond:
            self._end_decoding()
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def finish(self, conn, status: Status) -> None:
        """The build's final write, in the caller's transaction (which checked the lease)."""
        if self.objects_placed:
            conn.execute(update(BuildObject).where(BuildObject.build_id == self.build_id).values(placed=True))
        values: dict = {"status": status.value, "finished_at": func.now(), "worker": None}
        if sum(self.sizes.values()) <= COLUMN_LIMIT:
            values["output"] = _folded_output(BuildJobOutput.build_id == self.build_id)
            conn.execute(update(Build).where(Build.id == self.build_id).values(**values))
            conn.execute(delete(BuildJobOutput).where(BuildJobOutput.build_id == self.build_id))
        else:
            conn.execute(update(Build).where(Build.id == self.build_id).values(**values))

    # -- the writer thread ------------------------------------------------------

    def _queue(self, op: list[Any], urgent: bool = False) -> None:
        with self._cond:
            self._ops.append(op)
            if urgent:
                self._urgent = True
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
        while True:
            with self._cond:
                if not self._ops and not self._stopping:
                    self._cond.wait(FLUSH_SECONDS)
                if not self._urgent and not self._stopping and self._pending < FLUSH_BYTES:
                    self._cond.wait(FLUSH_SECONDS)
                ops, self._ops = self._ops, []
                self._urgent = False
                stopping = self._stopping
            while ops:
                try:
                    self._write(ops)
                    break
                except Exception as exc:  # the database may be restarting: keep the batch and retry
                    log.warning("build %s: recording failed, retrying: %s", self.build_id, exc)
                    time.sleep(RETRY_SECONDS)
            with self._cond:
                self._pending -= sum(len(c) for op in ops if op[0] == "output" for c in op[2])
                self._cond.notify_all()
                if stopping and not self._ops:
                    return

    def _write(self, ops: list[list[Any]]) -> None:
        if not self.allowed():
            return
        sizes = dict(self.sizes)
        with self.engine.begin() as conn:
            for op in ops:
                kind, job_id = op[0], op[1]
                if kind == "start":
                    conn.execute(
                        update(BuildJob).where(BuildJob.id == job_id).values(status=Status.RUNNING.value, started_at=op[2])
                    )
                elif kind == "output":
                    data = "".join(op[2])
                    conn.execute(insert(BuildJobOutput).values(build_id=self.build_id, job_id=job_id, data=data))
                    sizes[job_id] = sizes.get(job_id, 0) + len(data)
                elif op[4]:  # a job that ran finished
                    values = {"status": op[2].value, "finished_at": op[3]}
                    if sizes.get(job_id, 0) <= COLUMN_LIMIT:
                        values["output"] = _folded_output(BuildJobOutput.job_id == job_id)
                    conn.execute(update(BuildJob).where(BuildJob.id == job_id).values(**values))
                else:
                    conn.execute(
                        update(BuildJob)
                        .where(BuildJob.id == job_id)
                        .values(status=op[2].value, started_at=func.coalesce(BuildJob.started_at, op[3]), finished_at=op[3])
                    )
        self.sizes = sizes


class BuildArtifacts:
    """The runner's ArtifactStore for one build: files in the artifact store, rows in build_artifacts."""

    def __init__(self, engine: Engine, build_id: int, user_id: int, job_ids: dict[int, int], files: FileStore) -> None:
        self.engine = engine
        self.build_id = build_id
        self.user_id = user_id
        self.job_ids = job_ids
        self.files = files

    def store(self, job: JobPlan, name: str, data: BinaryIO) -> StoredArtifact:
        job_id = self.job_ids[id(job)]
        with self.engine.begin() as conn:
            row = conn.execute(
                select(BuildArtifact.id, BuildArtifact.hash).where(BuildArtifact.job_id == job_id, BuildArtifact.name == name)
            ).first()
            if row is None:
                hash_ = secrets.token_hex(16)
                artifact_id = conn.execute(
                    insert(BuildArtifact)
                    .values(user_id=self.user_id, build_id=self.build_id, job_id=job_id, hash=hash_, source=name, name=name)
                    .returning(BuildArtifact.id)
                ).scalar_one()
            else:
                artifact_id, hash_ = row
        stored = self.files.write(self.user_id, hash_, data)
        with self.engine.begin() as conn:
            conn.execute(
                update(BuildArtifact)
                .where(BuildArtifact.id == artifact_id)
                .values(size=stored.size, md5=bytes.fromhex(stored.md5), sha256=bytes.fromhex(stored.sha256))
            )
        return StoredArtifact(name, stored.size, stored.md5, stored.sha256, stored.truncated)


def stream_output(sessions, build_id: int, follow: bool = False, poll: float = 0.2) -> Iterator[str]:
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
