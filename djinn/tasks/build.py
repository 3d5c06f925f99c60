"""The build task: the Celery edge around djinn.worker.execute.run_build.

A build that ends failed, killed or timed_out makes the task fail with
BuildFailed once the build's rows are final, so the outcome goes through
Celery's failure machinery: BuildTask.on_failure hands the failure mail to its
own task (djinn.notify). BuildFailed is listed in `throws`, so Celery logs it as
an expected outcome, not as an error with a traceback. Any other exception is a
bug in the worker and is mailed to the operator with its traceback.

A build that cannot be claimed because PostgreSQL is unreachable (after the
claim's own retries for orphan_timeout) is rejected back to the queue
rather than acknowledged: with acks_late the message is still unacknowledged, and
Reject(requeue=True) puts it back on the Redis list for the next free worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject

from djinn import notify
from djinn.status import Status
from djinn.tasks import notify as _notify_tasks  # noqa: F401  (registers the notification tasks)
from djinn.worker import context
from djinn.worker.execute import ClaimDeferred, run_build
from djinn.worker.queue import RUN_BUILD

log = logging.getLogger(__name__)


class BuildFailed(Exception):
    """The build ended failed, killed or timed_out (a result for Celery's failure hooks, not a worker error)."""

    def __init__(self, build_id: int, status: Status) -> None:
        super().__init__(f"build {build_id} {status}")
        self.build_id = build_id
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (BuildFailed, (self.build_id, self.status))


class BuildTask(Task):
    """Mails about failed builds from Celery's failure hook."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        ctx = context.current()
        if isinstance(exc, BuildFailed):
            notify.on_build_failed(ctx, exc.build_id, exc.status, host=(kwargs or {}).get("host"))
        else:
            notify.on_task_error(ctx, int(args[0]) if args else None, str(einfo.traceback))


@shared_task(base=BuildTask, name=RUN_BUILD, acks_late=True, ignore_result=True, throws=(BuildFailed,))
def run_build_task(build_id: int, host: str | None = None) -> str | None:
    """Run one build, given only its id: everything else is read from the database.

    `host`, when given (a curlyq job's payload), is what the failure mail links to.

    Returns the final status, or None when this worker did not run the build
    (finished already, or run by another worker); raises BuildFailed for a
    build that ended failed, killed or timed_out.
    """
    build_id = int(build_id)
    try:
        status = run_build(context.current(), build_id)
    except ClaimDeferred as exc:
        log.warning("build %s: not claimed, its message goes back to the queue: %s", build_id, exc)
        raise Reject(str(exc), requeue=True) from None
    if status is None:
        return None
    if status.is_failure:
        raise BuildFailed(build_id, status)
    return status.value
