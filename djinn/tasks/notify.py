"""The notification tasks, the mail sweep and the outbox dispatcher: the Celery edge of djinn.notify.

The mail tasks run on the worker's own queue (djinn.notify.common.send_task) and
retry with exponential backoff while the SMTP server is away; a retry is a new
message with a countdown, so a waiting mail holds no pool process.

Commit statuses and webhooks are sent by the outbox dispatcher
(djinn.notify.outbox) in the main process, started here when the worker is
ready. The set_commit_status and deliver_webhook tasks stay registered for
messages an older worker queued; nothing queues them any more.
"""

from __future__ import annotations

import smtplib
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from djinn.notify import mail, statuses, webhooks
from djinn.notify.common import DELIVER_WEBHOOK, SEND_ADMIN_MAIL, SEND_FAILURE_MAIL, SET_COMMIT_STATUS, log
from djinn.notify.outbox import Dispatcher
from djinn.notify.sweep import Sweeper, sweep
from djinn.worker import context

# SMTP unreachable or refusing for now, or the database restarting.
MAIL_RETRY = (OSError, smtplib.SMTPException, OperationalError)
# Backoff 1, 2, 4, 8, then at most 15 s apart (with full jitter): a mail arrives
# soon after the SMTP server comes back; 3000 tries cover more than six hours.
MAIL_BACKOFF_MAX = 15
MAIL_MAX_RETRIES = 3000


def _outcome(what: str, result: str) -> str:
    """Say what a notification task did: Celery's own line per task is left to the debug level (djinn.observe.logs)."""
    log.info("%s: %s", what, result)
    return result


class FailureMailTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Retries exhausted (only retried errors get here as such): record it, so nothing waits for it."""
        if isinstance(exc, MAIL_RETRY) and args:
            try:
                mail.give_up_failure_mail(context.current(), int(args[0]), f"{type(exc).__name__}: {exc}")
            except Exception as db_exc:
                log.error("build %s: cannot record the failure mail as given up: %s", args[0], db_exc)


@shared_task(
    base=FailureMailTask,
    name=SEND_FAILURE_MAIL,
    acks_late=True,
    ignore_result=True,
    autoretry_for=MAIL_RETRY,
    retry_backoff=1,
    retry_backoff_max=MAIL_BACKOFF_MAX,
    retry_jitter=True,
    max_retries=MAIL_MAX_RETRIES,
)
def send_failure_mail(build_id: int, host: str | None = None) -> str:
    """Send a failed build's mail, once (djinn.notify.mail); `host` overrides the config's for the link."""
    return _outcome(f"build {build_id}: failure mail", mail.deliver_failure_mail(context.current(), int(build_id), host))


@shared_task(
    name=SEND_ADMIN_MAIL,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(OSError, smtplib.SMTPException),
    retry_backoff=1,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=500,
)
def send_admin_mail(subject: str, body: str) -> str:
    """Tell the operator (`smtp.admin`) about an unexpected worker error."""
    return _outcome("admin mail", mail.send_admin_mail(context.current(), subject, body))


@shared_task(
    name=SET_COMMIT_STATUS,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(statuses.StatusRetry, OSError, OperationalError),
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=12,
)
def set_commit_status(build_id: int) -> str:
    """Post a pull-request build's current status to GitHub or GitLab."""
    return _outcome(f"build {build_id}: commit status", statuses.set_commit_status(context.current(), int(build_id)))


@shared_task(
    bind=True,
    name=DELIVER_WEBHOOK,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(webhooks.DeliveryFailed, OperationalError),
    retry_backoff=1,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
)
def deliver_webhook(self: Any, webhook_id: int, event: str, event_id: str, body: str) -> str:
    """POST one build event to one namespace webhook, recording the attempt."""
    result = webhooks.deliver(context.current(), int(webhook_id), event, event_id, body, redelivery=self.request.retries > 0)
    return _outcome(f"webhook {webhook_id} {event}", result)


_sweeper = None
_dispatcher = None


@worker_ready.connect
def start_notifiers(**_: Any) -> None:
    """Every worker sends due commit statuses and webhooks; workers that mail also sweep for owed mail."""
    global _sweeper, _dispatcher
    ctx = context.current()
    _dispatcher = Dispatcher(ctx).start()
    if ctx.config.smtp is None:
        return
    try:
        sweep(ctx)
    except Exception as exc:
        log.warning("mail sweep: %s", exc)
    _sweeper = Sweeper(ctx).start()


@worker_shutdown.connect
def stop_notifiers(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    if _dispatcher is not None:
        _dispatcher.stop()
