"""Running one queued build: claim the lease, load the rows, run, record, release.

Plain functions with no Celery in them: the task in djinn.tasks.build calls
`run_build`, and tests can call it too.

Under faults (djinn.db.lease has the guarantees):
- PostgreSQL unreachable at the claim: the claim is tried again with backoff
  for `orphan_timeout` (at least MIN_CLAIM_PATIENCE), then ClaimDeferred tells
  the task to give the message back to the queue; the message is never
  acknowledged as if the build had run.
- The heartbeat beats until the final write has landed; that write is tried
  again with backoff while PostgreSQL is away, so a job that finished is not run
  again because of a database blip.
- Fencing: once the lease may be gone (a beat matched no row, or none landed for
  `fence_after`) the running job is stopped at once and nothing more is written.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import RowMapping

from djinn import notify
from djinn.crypto import hasher
from djinn.db import load
from djinn.db.engine import DatabaseUnavailable, autocommit, in_transaction, is_unavailable, retry_while_unavailable, transaction
from djinn.db.lease import Heartbeat, Lease, abandon, finished_by
from djinn.db.models import Build
from djinn.db.recorder import BuildArtifacts, DatabaseReporter
from djinn.drivers import BuildIdentity, make_driver
from djinn.drivers.qemu import user_image_path
from djinn.errors import DjinnError
from djinn.observe import logs, metrics
from djinn.runner import control
from djinn.runner.control import RunControl, Stop
from djinn.runner.engine import Reporters, Runner
from djinn.runner.store import BuildObjects
from djinn.status import Status
from djinn.worker import shutdown
from djinn.worker.context import WorkerContext
from djinn.worker.kill import KillListener

log = logging.getLogger(__name__)

#: A claim waits orphan_timeout, and at least this long, for an unreachable PostgreSQL
#: before its message goes back to the queue.
MIN_CLAIM_PATIENCE = 10.0
#: The final write waits at least this long (and at least 10 orphan_timeouts) for PostgreSQL.
FINAL_WRITE_PATIENCE = 600.0


class ClaimDeferred(DjinnError):
    """The build could not be claimed now (PostgreSQL unreachable): its message must go back to the queue."""


def run_build(ctx: WorkerContext, build_id: int) -> Status | None:
    """Run build `build_id` if this worker can claim it; returns its final status, or None if not run.

    None also when the worker stopped and handed the build back to be rerun elsewhere.
    """
    shutdown.take_over_sigterm()
    with logs.build_context(build_id), control.running(build_id) as run:
        return _run_build(ctx, build_id, run)


def _run_build(ctx: WorkerContext, build_id: int, run: RunControl) -> Status | None:
    if run.requested(Stop.HANDED_BACK):
        shutdown.requeue_unclaimed(ctx, build_id)
        return None

    sent_at = [0.0]

    def claim() -> tuple[Lease, RowMapping] | None:
        sent_at[0] = time.monotonic()  # the claim sets the heartbeat: the lease's clock starts no later
        # The common case in autocommit, one round trip; anything else in a transaction.
        with autocommit(ctx.engine) as conn:
            claimed = load.claim_queued(conn, build_id, ctx.name)
        if claimed is not None:
            return claimed
        with transaction(ctx.sessions) as session:
            return load.claim_and_load(session, build_id, ctx.name)

    try:
        claimed = retry_while_unavailable(
            claim,
            patience=max(MIN_CLAIM_PATIENCE, ctx.config.orphan_timeout.total_seconds()),
            stop=lambda: run.requested(Stop.HANDED_BACK),
            what=f"build {build_id}: claim",
        )
    except DatabaseUnavailable as exc:
        raise ClaimDeferred(str(exc)) from None
    if claimed is None:
        log.info("build %s: not claimed (finished, missing or running elsewhere)", build_id)
        return None
    lease, row = claimed
    log.info("build %s: claimed (attempt %s)", build_id, lease.attempt)
    if row["wants_events"]:
        notify.on_build_started(ctx, build_id)
    driver_label = ctx.config.driver
    started = time.monotonic()
    metrics.emit("build_started", build=build_id, driver=driver_label, wait=float(row["waited"]))
    outcome = metrics.Outcome()
    try:
        status = _run_claimed(ctx, build_id, lease, sent_at[0], run, row, outcome)
        if status is not None:
            outcome.status = str(status)
        return status
    finally:
        metrics.emit(
            "build_finished", build=build_id, driver=driver_label, status=outcome.status, failure=outcome.failure,
            seconds=time.monotonic() - started,
        )


def _run_claimed(
    ctx: WorkerContext,
    build_id: int,
    lease: Lease,
    claimed_at: float,
    run: RunControl,
    row: RowMapping,
    outcome: metrics.Outcome,
) -> Status | None:
    """The claimed build's run; None when it was handed back or its lease lost (`outcome` says which)."""
    try:
        loaded = load.decode(row, ctx.cipher)
        configured = ctx.drivers.settings_for(loaded.driver_type)
        values = dict(loaded.driver_config)
        # A user's own image comes before the shared `_base` ones, as on the Go worker;
        # the setting is the worker's alone, whatever the manifest's driver block says.
        values["user_image"] = user_image_path(configured.disks, *loaded.image) if loaded.image else ""
        driver = make_driver(loaded.driver_type, values, BuildIdentity(str(build_id), ctx.name), configured=configured)
    except DjinnError as exc:
        with transaction(ctx.sessions) as session:
            build = session.get(Build, build_id, with_for_update=True)
            if build is not None:
                abandon(session, build, f"cannot run the build: {exc}")
        return Status.FAILED

    heartbeat = Heartbeat(
        ctx.sessions, lease, claimed_at, lambda: run.stop(Stop.LEASE_LOST), interval=ctx.heartbeat_interval, fence_after=ctx.fence_after
    )
    reporter = DatabaseReporter(ctx.engine, build_id, loaded.job_ids, heartbeat.valid, lease)
    runner = Runner(
        loaded.plan,
        driver,
        variables=loaded.variables,
        keys=loaded.keys,
        objects=BuildObjects(ctx.objects, loaded.objects),
        artifacts=BuildArtifacts(
            ctx.engine, build_id, loaded.user_id, loaded.job_ids, ctx.artifacts, hasher(ctx.config.crypto), lease, heartbeat.valid
        ),
        reporter=Reporters(metrics.JobMetrics(build_id, ctx.config.driver), reporter),  # the job named in the rows' log lines
        timeout=ctx.config.timeout.total_seconds(),
        control=run,
    )
    heartbeat.start()
    listener = KillListener(ctx.config.redis, build_id, loaded.secret, lambda: run.stop(Stop.KILLED)).start()
    try:
        try:
            status = runner.run()
        finally:
            listener.stop()
            heartbeat.finishing()  # the beats go on until the final write has landed
        outcome.failure = runner.failure
        if runner.error is not None:
            log.error("build %s: internal error: %r", build_id, runner.error)
            metrics.error(runner.error)
            notify.on_worker_error(ctx, build_id, runner.error)
        if run.lease_lost:
            outcome.status = metrics.LOST
            return None
        if status is Status.KILLED and run.handed_back:
            # The driver is destroyed (the runner always does); the rows go back to queued.
            # A hand-back that fails leaves the build on a lease nobody renews: the reaper requeues it.
            outcome.status = metrics.HANDED_BACK if shutdown.hand_back(ctx, lease) else metrics.LOST
            return None
        # wants_events was checked when the build was loaded: a webhook added while it ran is told from the next build on.
        events = ctx if loaded.wants_events else None
        if not _final_write(ctx, reporter, status, lease, run, events):
            outcome.status = metrics.LOST
            return None
    finally:
        heartbeat.stop()
    log.info("build %s: %s", build_id, status)
    return status


class _NotHeld(Exception):
    pass


def _final_write(
    ctx: WorkerContext,
    reporter: DatabaseReporter,
    status: Status,
    lease: Lease,
    run: RunControl,
    events: WorkerContext | None = None,
) -> bool:
    """Write the build's final rows, again with backoff while PostgreSQL is away; whether they landed.

    With `events`, the build's finished notifications are recorded in the same transaction.

    Tried until it lands, the lease is found gone, the worker is told to hand its
    builds back, or the patience runs out (then the reaper reruns the build).
    Trying past the point where the lease could go stale is safe: the write checks
    the lease in the same statement, so it lands only if nobody took the build over.
    """
    patience = max(FINAL_WRITE_PATIENCE, 10 * ctx.config.orphan_timeout.total_seconds())
    deadline = time.monotonic() + patience
    delay = 0.1
    failures = 0
    while True:
        try:
            # Without notifications to record with it, a short build's write is one statement on its own.
            alone = reporter.finish_alone(status, lease) if events is None else None
            if alone is False:
                raise _NotHeld()
            if alone is None:
                with transaction(ctx.sessions) as session:
                    if not reporter.finish(session.connection(), status, lease):
                        raise _NotHeld()  # rolls the transaction back
                    if events is not None:
                        notify.record_build_finished(events, session, lease.build_id)
            if failures:
                log.info("build %s: final write landed after %d failed tries", lease.build_id, failures)
            return True
        except _NotHeld:
            if failures and _landed_before(ctx, lease, status):
                return True
            log.error("build %s: lease lost before the final write; another worker owns the build", lease.build_id)
            return False
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            failures += 1
            if run.requested(Stop.HANDED_BACK) or time.monotonic() + delay > deadline:
                log.error(
                    "build %s: final write not possible (%s); the build is rerun once its lease is stale", lease.build_id, exc
                )
                return False
            if failures == 1 or failures % 10 == 0:
                log.warning("build %s: final write failed (%s); trying again", lease.build_id, exc)
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _landed_before(ctx: WorkerContext, lease: Lease, status: Status) -> bool:
    """Whether an earlier try of the final write committed though its COMMIT was not confirmed."""
    try:
        return retry_while_unavailable(
            in_transaction(ctx.sessions, lambda session: finished_by(session, lease, status)),
            patience=30.0,
            what=f"build {lease.build_id}: final write",
        )
    except DatabaseUnavailable:
        return False
