"""Telling people about builds: failure mail (SPEC 6), commit statuses and webhooks (SPEC 7).

The hooks below are called where a build starts and ends. They only read a few
rows and queue tasks (djinn.notify.tasks) on the worker's own queue, and they
never raise: a notification that cannot be queued is logged, it must not fail
or hold up the build. The failure mail is the exception that is also kept in
the database (djinn.notify.mail), so it is never lost.

- on_build_started / on_build_finished: from djinn.execute.run_build right after
  the claim and right after the final write, for builds that want events.
- on_build_failed: from the build task's Celery failure hook
  (djinn.tasks.build), once the build's rows are final.
- on_worker_error / on_task_error: a bug in the worker, mailed to `smtp.admin`
  with the traceback.
"""

from __future__ import annotations

import functools
import traceback
from typing import Any, Callable, TypeVar

from djinn.notify.common import (
    DELIVER_WEBHOOK,
    FAILED,
    SEND_ADMIN_MAIL,
    SEND_FAILURE_MAIL,
    SET_COMMIT_STATUS,
    build_url,
    host,
    log,
    send_task,
)
from djinn.status import Status

__all__ = [
    "FAILED",
    "build_url",
    "host",
    "on_build_failed",
    "on_build_finished",
    "on_build_started",
    "on_task_error",
    "on_worker_error",
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


# SQL: whether build `b` has anyone to tell about its events (a pull request or a
# namespace webhook). Most builds have neither: djinn.execute reads this when it
# loads a build and calls on_build_started / on_build_finished only when true.
WANTS_EVENTS = """
    EXISTS (SELECT 1 FROM build_triggers t WHERE t.build_id = b.id AND t.type = 'pull')
    OR EXISTS (SELECT 1 FROM namespace_webhooks w WHERE w.namespace_id = b.namespace_id)
"""


def _build_events(ctx: Any, build_id: int, event: str) -> None:
    """Queue the commit status and the webhook deliveries for a build event."""
    from djinn.models import Build
    from djinn.notify.statuses import wants_status
    from djinn.notify.webhooks import event_payloads

    with ctx.sessions() as session:
        build = session.get(Build, build_id)
        if build is None:
            return
        status = wants_status(build.trigger)
        deliveries = event_payloads(ctx, session, build_id, event)
    if status:
        send_task(ctx, SET_COMMIT_STATUS, build_id)
    for webhook_id, name, event_id, body in deliveries:
        send_task(ctx, DELIVER_WEBHOOK, webhook_id, name, event_id, body)


@_never_raises
def on_build_started(ctx: Any, build_id: int) -> None:
    """The build was claimed and is running: commit status and `build.started` webhooks."""
    _build_events(ctx, build_id, "build.started")


@_never_raises
def on_build_finished(ctx: Any, build_id: int, status: Status) -> None:
    """The build's rows are final: commit status and `build.finished` webhooks."""
    _build_events(ctx, build_id, "build.finished")


@_never_raises
def on_build_failed(ctx: Any, build_id: int, status: Status, host: str | None = None) -> None:
    """The build ended failed, killed or timed_out: owe its mail, and hand it to the mail task.

    `host`: the Djinn server the build was queued from, for the mail's link.
    """
    from djinn.notify.mail import owe_failure_mail

    if owe_failure_mail(ctx, build_id):
        if host:
            send_task(ctx, SEND_FAILURE_MAIL, build_id, host)
        else:
            send_task(ctx, SEND_FAILURE_MAIL, build_id)


def _admin_mail(ctx: Any, build_id: int | None, traceback_text: str) -> None:
    from djinn.notify.mail import worker_error_mail

    if ctx.config.smtp is None:
        return
    subject, body = worker_error_mail(ctx, build_id, traceback_text)
    send_task(ctx, SEND_ADMIN_MAIL, subject, body)


@_never_raises
def on_worker_error(ctx: Any, build_id: int, error: BaseException) -> None:
    """The runner met an unexpected exception (runner.error): the operator gets the traceback."""
    _admin_mail(ctx, build_id, "".join(traceback.format_exception(error)))


@_never_raises
def on_task_error(ctx: Any, build_id: int | None, traceback_text: str) -> None:
    """The build task itself raised (a bug, not a failed build): the operator gets the traceback."""
    _admin_mail(ctx, build_id, traceback_text)
