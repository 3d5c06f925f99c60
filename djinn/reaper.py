"""Finding builds whose worker died and queueing them again (SPEC section 5).

Every worker runs a reaper in its main process; the row lock taken with SKIP
LOCKED lets several reapers share the work without requeueing a build twice.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select

from djinn.context import WorkerContext
from djinn.db import transaction
from djinn.execute import remove_artifact_files
from djinn.lease import MAX_ATTEMPTS, abandon, orphans, reset_for_rerun
from djinn.models import Build
from djinn.periodic import Periodic
from djinn.queue import enqueue
from djinn.status import Status
from djinn.submit import queue_for

log = logging.getLogger(__name__)


def reap(ctx: WorkerContext) -> list[int]:
    """Requeue (or, after MAX_ATTEMPTS, fail) every orphaned build; returns their ids."""
    done = []
    with transaction(ctx.sessions) as session:
        for build in orphans(session, ctx.stale_after):
            dead_worker = build.worker
            reset_for_rerun(session, build, lambda b: remove_artifact_files(ctx, session, b.id))
            if build.attempt >= MAX_ATTEMPTS:
                abandon(session, build, f"the build was started {build.attempt} times and each worker running it died; giving up")
                log.error("build %s: abandoned after %s attempts", build.id, build.attempt)
            else:
                # Sent before the commit: if the broker is down the reset is rolled back
                # and the next pass tries again. A duplicate message is dropped by the claim.
                enqueue(ctx.app, build.id, queue_for(build.driver.type, build.driver.config))
                log.warning("build %s: worker %s stopped beating; queued again", build.id, dead_worker)
            done.append(build.id)
    return done


def sweep_leftovers(ctx: WorkerContext) -> list[str]:
    """At start-up: remove what builds no live worker runs left behind in the driver.

    docker: containers and volumes of builds not running with a fresh heartbeat
    (the engine may be shared by several hosts); os: build directories and the
    processes still running in them, qemu: VMs and their overlay directories,
    each when the worker process that made them is gone (djinn.drivers.leftovers).
    """
    kind = "qemu" if ctx.config.driver == "qemu-x86_64" else ctx.config.driver
    if kind == "docker":
        from djinn.drivers.docker import sweep

        with ctx.sessions() as session:
            live = {str(b.id) for b in session.scalars(
                select(Build).where(Build.status == Status.RUNNING.value, Build.heartbeat_at >= func.now() - ctx.stale_after)
            )}
        removed = sweep(ctx.drivers.settings_for("docker"), keep=live)
    elif kind == "os":
        from djinn.drivers.os import sweep as sweep_os

        removed = sweep_os()
    elif kind == "qemu":
        from djinn.drivers.qemu import sweep as sweep_qemu

        removed = sweep_qemu()
    else:
        return []
    for item in removed:
        log.warning("removed leftover %s of a build that no longer runs", item)
    return removed


def Reaper(ctx: WorkerContext) -> Periodic:
    """The reaper thread of a worker's main process."""
    return Periodic("reaper", ctx.reaper_interval, lambda: reap(ctx))
