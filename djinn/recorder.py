"""Recording a running build in PostgreSQL: job statuses, timestamps, output and artifacts.

Output is appended as rows of `build_job_output` while a job runs (buffered,
flushed at least every FLUSH_SECONDS so `logs -f` stays live), which keeps the
cost of storing output linear and the worker's memory constant. When the build
ends the chunks are folded into `build_jobs.output` and `builds.output`.
"""

from __future__ import annotations

import codecs
import secrets
import threading
import time
from typing import BinaryIO, Callable, Iterator

from sqlalchemy import Engine, delete, func, insert, select, text, update

from djinn.errors import DjinnError
from djinn.models import Build, BuildArtifact, BuildJob, BuildJobOutput, BuildObject
from djinn.plan import CREATE_DRIVER, JobPlan
from djinn.runner import Reporter
from djinn.status import Status
from djinn.store import FileStore, StoredArtifact

FLUSH_BYTES = 256 * 1024
FLUSH_SECONDS = 0.25
# Output larger than this stays in build_job_output rather than being copied into
# the single text columns (PostgreSQL cannot hold a value over 1 GB in a column).
COLUMN_LIMIT = 256 * 1024 * 1024


class OutputWriter:
    """Buffers one build's output and appends it as chunks, in order, from any thread."""

    def __init__(self, engine: Engine, build_id: int, allowed: Callable[[], bool] = lambda: True) -> None:
        self.engine = engine
        self.build_id = build_id
        self.allowed = allowed
        self._lock = threading.Lock()
        self._job_id: int | None = None
        self._buffer: list[str] = []
        self._buffered = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.sizes: dict[int, int] = {}
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name=f"output-{build_id}", daemon=True)
        self._flusher.start()

    def write(self, job_id: int, data: bytes) -> None:
        with self._lock:
            if job_id != self._job_id:
                self._flush_locked(final=True)
                self._job_id = job_id
            chunk = self._decoder.decode(data)
            if chunk:
                self._buffer.append(chunk)
                self._buffered += len(chunk)
            if self._buffered >= FLUSH_BYTES:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked(final=True)

    def close(self) -> None:
        self._stop.set()
        self._flusher.join()
        self.flush()

    def _flush_periodically(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # the database may be restarting: the next flush retries
                pass

    def _flush_locked(self, final: bool = False) -> None:
        if final and self._job_id is not None:
            tail = self._decoder.decode(b"", final=True)
            self._decoder.reset()
            if tail:
                self._buffer.append(tail)
                self._buffered += len(tail)
        if not self._buffer or self._job_id is None:
            return
        data = "".join(self._buffer)
        if self.allowed():
            with self.engine.begin() as conn:
                conn.execute(insert(BuildJobOutput).values(build_id=self.build_id, job_id=self._job_id, data=data))
        self.sizes[self._job_id] = self.sizes.get(self._job_id, 0) + len(data)
        self._buffer.clear()
        self._buffered = 0


class DatabaseReporter(Reporter):
    """Keeps the build's rows up to date as the runner reports."""

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
        self.output = OutputWriter(engine, build_id, allowed)
        self.final: Status | None = None
        self.objects_placed = False

    def _job_id(self, job: JobPlan) -> int:
        # Keyed by the plan's job objects themselves: two jobs may be equal in every field.
        return self.job_ids[id(job)]

    def _update_job(self, job: JobPlan, **values) -> None:
        if not self.allowed():
            return
        with self.engine.begin() as conn:
            conn.execute(update(BuildJob).where(BuildJob.id == self._job_id(job)).values(**values))

    def job_started(self, job: JobPlan) -> None:
        self._update_job(job, status=Status.RUNNING.value, started_at=func.now())

    def job_output(self, job: JobPlan, data: bytes) -> None:
        self.output.write(self._job_id(job), data)

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        job_id = self._job_id(job)
        if job.name == CREATE_DRIVER and ran and status is Status.PASSED:
            self.objects_placed = True
        if ran:
            self.output.flush()
            values = {"status": status.value, "finished_at": func.now()}
            if self.output.sizes.get(job_id, 0) <= COLUMN_LIMIT:
                values["output"] = (
                    select(func.coalesce(func.string_agg(BuildJobOutput.data, text("'' ORDER BY build_job_output.id")), ""))
                    .where(BuildJobOutput.job_id == job_id)
                    .scalar_subquery()
                )
            self._update_job(job, **values)
        else:
            self._update_job(
                job, status=status.value, started_at=func.coalesce(BuildJob.started_at, func.now()), finished_at=func.now()
            )

    def build_finished(self, status: Status) -> None:
        self.output.close()
        self.final = status

    def finish(self, conn, status: Status) -> None:
        """The build's final write, in the caller's transaction (which checked the lease)."""
        if self.objects_placed:
            conn.execute(update(BuildObject).where(BuildObject.build_id == self.build_id).values(placed=True))
        values: dict = {"status": status.value, "finished_at": func.now(), "worker": None}
        if sum(self.output.sizes.values()) <= COLUMN_LIMIT:
            values["output"] = (
                select(func.coalesce(func.string_agg(BuildJobOutput.data, text("'' ORDER BY build_job_output.id")), ""))
                .where(BuildJobOutput.build_id == self.build_id)
                .scalar_subquery()
            )
            conn.execute(update(Build).where(Build.id == self.build_id).values(**values))
            conn.execute(delete(BuildJobOutput).where(BuildJobOutput.build_id == self.build_id))
        else:
            conn.execute(update(Build).where(Build.id == self.build_id).values(**values))


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
