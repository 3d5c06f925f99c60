"""Telling people about builds: failure mail (SPEC 6), commit statuses and webhooks (SPEC 7).

The hooks below are called where a build starts and ends, and never raise: a
notification that cannot be recorded is logged, it must not fail or hold up the
build. Everything owed is kept in the database first, so a broker outage loses
nothing: failure mail in build_notifications (djinn.notify.mail, sent by Celery
tasks and a sweep), commit statuses and webhooks in notification_outbox
(djinn.notify.outbox, sent by each worker's dispatcher thread, outside the
build pool).

- on_build_started: from djinn.worker.execute.run_build right after the claim, for
  builds that want events; record_build_finished: inside the transaction of
  the build's final write, so the event is recorded exactly when the build ends.
- on_build_failed: from the build task's Celery failure hook
  (djinn.tasks.build), once the build's rows are final.
- on_worker_error / on_task_error: a bug in the worker, mailed to `smtp.admin`
  with the traceback.
"""

from __future__ import annotations

import functools
import traceback
from typing import Any, Callable, TypeVar

from djinn.db.engine import transaction
from djinn.notify.common import (
    SEND_ADMIN_MAIL,
    SEND_FAILURE_MAIL,
    NotifyContext,
    build_url,
    host,
    log,
    send_task,
)
from djinn.notify.mail import owe_failure_mail, worker_error_mail
from djinn.notify.outbox import record_event
from djinn.status import Status

__all__ = [
    "build_url",
    "host",
    "on_build_failed",
    "on_build_started",
    "on_task_error",
    "on_worker_error",
    "record_build_finished",
]

F = TypeVar("F", bound=Callable[..., None])


def _never_raises(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("%s failed; the build is not affected", fn.__name__)

    return wrapper  # type: ignore[return-value]


@_never_raises
def on_build_started(ctx: NotifyContext, build_id: int) -> None:
    """The build was claimed and is running: record its commit status and `build.started` webhooks."""
    with transaction(ctx.sessions) as session:
        record_event(ctx, session, build_id, "build.started")


def record_build_finished(ctx: NotifyContext, session: Any, build_id: int) -> int:
    """The build's final rows are being written in `session`: record its `build.finished` notifications with them.

    Raises like any other statement of that transaction (it is part of it).
    """
    return record_event(ctx, session, build_id, "build.finished")


@_never_raises
def on_build_failed(ctx: NotifyContext, build_id: int, status: Status, host: str | None = None) -> None:
    """The build ended failed, killed or timed_out: owe its mail, and hand it to the mail task.

    `host`: the Djinn server the build was queued from, for the mail's link.
    """
    if owe_failure_mail(ctx, build_id):
        if host:
            send_task(ctx, SEND_FAILURE_MAIL, build_id, host)
        else:
            send_task(ctx, SEND_FAILURE_MAIL, build_id)


def _admin_mail(ctx: NotifyContext, build_id: int | None, traceback_text: str) -> None:
    if ctx.config.smtp is None:
        return
    subject, body = worker_error_mail(ctx, build_id, traceback_text)
    send_task(ctx, SEND_ADMIN_MAIL, subject, body)


@_never_raises
def on_worker_error(ctx: NotifyContext, build_id: int, error: BaseException) -> None:
    """The runner met an unexpected exception (runner.error): the operator gets the traceback."""
    _admin_mail(ctx, build_id, "".join(traceback.format_exception(error)))


@_never_raises
def on_task_error(ctx: NotifyContext, build_id: int | None, traceback_text: str) -> None:
    """The build task itself raised (a bug, not a failed build): the operator gets the traceback."""
    _admin_mail(ctx, build_id, traceback_text)
