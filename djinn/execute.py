"""Running one queued build: claim the lease, load the rows, run, record, release.

Plain functions with no Celery in them: the task in djinn.tasks.build calls
`run_build`, and tests can call it too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

from sqlalchemy import select

from djinn.context import WorkerContext
from djinn.db import transaction
from djinn.drivers import make_driver
from djinn.errors import DjinnError
from djinn.kill import KillListener
from djinn.lease import Lease, abandon, beat, claim, held
from djinn.manifest import Passthrough
from djinn.models import Build, BuildArtifact, Object
from djinn.plan import BuildPlan, JobPlan, StagePlan
from djinn.recorder import BuildArtifacts, DatabaseReporter
from djinn.runner import Key, Runner, Variable
from djinn.status import Status
from djinn.store import FileStore, StoreError

log = logging.getLogger(__name__)


@dataclass
class LoadedBuild:
    """Everything a run needs, read from the database in one go."""

    id: int
    user_id: int
    number: int
    secret: str
    driver_type: str
    driver_config: dict
    plan: BuildPlan
    job_ids: dict[int, int] = field(default_factory=dict)
    variables: list[Variable] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    objects: dict[str, tuple[int, str]] = field(default_factory=dict)


class BuildObjects:
    """The runner's ObjectStore for one build: the objects its rows name, from the object store."""

    def __init__(self, files: FileStore, objects: dict[str, tuple[int, str]]) -> None:
        self.files = files
        self.objects = objects

    def open(self, name: str) -> BinaryIO:
        if name not in self.objects:
            raise StoreError(f"object {name!r} no longer exists")
        user_id, hash_ = self.objects[name]
        return self.files.open(user_id, hash_)


def load_build(ctx: WorkerContext, session, build_id: int) -> LoadedBuild:
    build = session.get(Build, build_id)
    artifacts: dict[int, list[BuildArtifact]] = {}
    for artifact in build.artifacts:
        artifacts.setdefault(artifact.job_id, []).append(artifact)
    job_ids: dict[int, int] = {}
    stages = []
    for stage in build.stages:
        jobs = []
        for job in stage.jobs:
            plan_job = JobPlan(
                stage.name,
                job.name,
                tuple(job.commands.split("\n")) if job.commands else (),
                tuple(Passthrough(a.source, a.name) for a in artifacts.get(job.id, [])),
            )
            job_ids[id(plan_job)] = job.id
            jobs.append(plan_job)
        stages.append(StagePlan(stage.name, stage.can_fail, tuple(jobs)))
    objects = {}
    for obj in build.objects:
        row = session.get(Object, obj.object_id) if obj.object_id else None
        if row is not None:
            objects[obj.source] = (row.user_id, row.hash)
    plan = BuildPlan(stages=tuple(stages), objects=tuple(Passthrough(o.source, o.name) for o in build.objects))

    variables = []
    for var in build.variables:
        value = var.value
        if var.masked:
            if ctx.cipher is None:
                raise DjinnError("the build has masked variables but the worker config has no crypto block")
            value = ctx.cipher.decrypt_text(value)
        variables.append(Variable(var.key, value, var.masked))
    keys = []
    for key in build.keys:
        if ctx.cipher is None:
            raise DjinnError("the build has keys but the worker config has no crypto block")
        keys.append(Key(key.name, ctx.cipher.decrypt(key.key).decode(), key.config or ""))
    return LoadedBuild(
        id=build.id,
        user_id=build.user_id,
        number=build.number,
        secret=build.secret or "",
        driver_type=build.driver.type if build.driver else "",
        driver_config=dict(build.driver.config) if build.driver else {},
        plan=plan,
        job_ids=job_ids,
        variables=variables,
        keys=keys,
        objects=objects,
    )


class Heartbeat:
    """Keeps the lease fresh; tells the caller when another worker has taken the build."""

    def __init__(self, ctx: WorkerContext, lease: Lease, on_lost) -> None:
        self.ctx = ctx
        self.lease = lease
        self.on_lost = on_lost
        self.lost = False
        self.interval = ctx.heartbeat_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.build_id}", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with transaction(self.ctx.sessions) as session:
                    alive = beat(session, self.lease)
            except Exception as exc:  # the database may be restarting; the lease is stale only later
                log.warning("build %s: heartbeat failed: %s", self.lease.build_id, exc)
                continue
            if not alive:
                log.error("build %s: lease lost to another worker; stopping this run", self.lease.build_id)
                self.lost = True
                self.on_lost()
                return


def run_build(ctx: WorkerContext, build_id: int) -> Status | None:
    """Run build `build_id` if this worker can claim it; returns its final status, or None if not run."""
    with transaction(ctx.sessions) as session:
        lease = claim(session, build_id, ctx.name, ctx.stale_after, on_reset=lambda b: remove_artifact_files(ctx, session, b.id))
    if lease is None:
        log.info("build %s: not claimed (finished, missing or running elsewhere)", build_id)
        return None
    log.info("build %s: claimed (attempt %s)", build_id, lease.attempt)

    try:
        with ctx.sessions() as session:
            loaded = load_build(ctx, session, build_id)
        settings = {
            **ctx.drivers.settings_for(loaded.driver_type),
            **loaded.driver_config,
            "build_id": str(build_id),
            "worker": ctx.name,
        }
        driver = make_driver(loaded.driver_type, settings)
    except DjinnError as exc:
        with transaction(ctx.sessions) as session:
            build = session.get(Build, build_id, with_for_update=True)
            abandon(session, build, f"cannot run the build: {exc}")
        return Status.FAILED

    heartbeat: Heartbeat | None = None
    allowed = lambda: heartbeat is None or not heartbeat.lost  # noqa: E731
    reporter = DatabaseReporter(ctx.engine, build_id, loaded.job_ids, allowed)
    runner = Runner(
        loaded.plan,
        driver,
        variables=loaded.variables,
        keys=loaded.keys,
        objects=BuildObjects(ctx.objects, loaded.objects),
        artifacts=BuildArtifacts(ctx.engine, build_id, loaded.user_id, loaded.job_ids, ctx.artifacts),
        reporter=reporter,
        timeout=ctx.config.timeout.total_seconds(),
    )
    heartbeat = Heartbeat(ctx, lease, lambda: runner.cancel(Status.KILLED)).start()
    listener = KillListener(ctx.config.redis, build_id, loaded.secret, lambda: runner.cancel(Status.KILLED)).start()
    try:
        status = runner.run()
    finally:
        listener.stop()
        heartbeat.stop()
    if runner.error is not None:
        log.error("build %s: internal error: %r", build_id, runner.error)
    if heartbeat.lost:
        return None
    with transaction(ctx.sessions) as session:
        if not held(session, lease):
            log.error("build %s: lease lost before the final write; another worker owns it", build_id)
            return None
        reporter.finish(session.connection(), status)
    log.info("build %s: %s", build_id, status)
    return status


def remove_artifact_files(ctx: WorkerContext, session, build_id: int) -> None:
    """A rerun starts clean: files the dead attempt stored go."""
    for user_id, hash_ in session.execute(
        select(BuildArtifact.user_id, BuildArtifact.hash).where(BuildArtifact.build_id == build_id)
    ):
        ctx.artifacts.remove(user_id, hash_)
