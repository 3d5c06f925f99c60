"""Commit statuses and webhook deliveries, recorded first and sent from the record (SPEC section 7).

A build event (`build.started` after the claim, `build.finished` in the same
transaction as the build's final write) becomes rows in `notification_outbox`:
one per commit status and one per webhook, the webhook payload fixed then. The
broker is not involved: a Redis outage at that moment loses nothing.

Every worker's main process runs a Dispatcher: a thread that claims due rows
(pending -> sending, SKIP LOCKED, so several workers share the work) and sends
them on a few threads of its own, never through the build pool, so a status or
a webhook does not wait behind long builds. A failed attempt puts the row back
to pending, due again after an exponential backoff; when its attempts are used
up it ends `failed` with the reason. A worker that dies mid-send leaves the row
`sending`; after SENDING_STALE another dispatcher sends it again (the one
duplicate left, with the same webhook event id, rather than a lost event).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from djinn.db.engine import rowcount, transaction
from djinn.db.models import Build, NotificationOutbox
from djinn.notify import statuses, webhooks
from djinn.notify.common import NotifyContext, log

STATUS, WEBHOOK = "status", "webhook"
PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
# Attempts before a row is given up, and the cap of the backoff between them:
# 12 status attempts span about half an hour, 8 webhook attempts about ten minutes.
MAX_ATTEMPTS = {STATUS: 12, WEBHOOK: 8}
BACKOFF_MAX = 300.0
# Longer than any one attempt can take (an HTTP timeout is 10 s).
SENDING_STALE = dt.timedelta(minutes=2)
POLL_INTERVAL = 1.0
SENDERS = 4
# Rows that are done are kept this long (to see what was sent), then deleted, looked for every PRUNE_EVERY seconds.
KEEP_DONE = dt.timedelta(days=7)
PRUNE_EVERY = 3600.0
# Transient trouble: the other side away or failing, or the database restarting.
RETRYABLE = (statuses.StatusRetry, webhooks.DeliveryFailed, SQLAlchemyError, OSError)


def record_event(ctx: NotifyContext, session: Session, build_id: int, event: str) -> int:
    """Record the commit status and webhook deliveries `event` owes, in the caller's transaction; returns how many."""
    build = session.get(Build, build_id)
    if build is None:
        return 0
    rows = []
    if statuses.wants_status(build.trigger):
        rows.append(NotificationOutbox(build_id=build_id, kind=STATUS, event=event))
    for webhook_id, name, event_id, body in webhooks.event_payloads(ctx, session, build_id, event):
        rows.append(
            NotificationOutbox(build_id=build_id, kind=WEBHOOK, event=name, webhook_id=webhook_id,
                               event_id=uuid.UUID(event_id), body=body)
        )
    session.add_all(rows)
    session.flush()
    return len(rows)


def claim_due(ctx: NotifyContext, limit: int) -> list[int]:
    """Take up to `limit` due rows for this worker (pending -> sending); stale `sending` rows go back to pending first."""
    with transaction(ctx.sessions) as session:
        session.execute(
            update(NotificationOutbox)
            .where(NotificationOutbox.state == SENDING, NotificationOutbox.updated_at < func.now() - SENDING_STALE)
            .values(state=PENDING, due_at=func.now(), error="the worker sending it stopped; sending again")
        )
        ids = list(
            session.scalars(
                select(NotificationOutbox.id)
                .where(NotificationOutbox.state == PENDING, NotificationOutbox.due_at <= func.now())
                .order_by(NotificationOutbox.due_at, NotificationOutbox.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if ids:
            session.execute(
                update(NotificationOutbox)
                .where(NotificationOutbox.id.in_(ids))
                .values(state=SENDING, attempts=NotificationOutbox.attempts + 1, updated_at=func.now())
            )
    return ids


def prune(ctx: NotifyContext) -> int:
    """Delete rows sent or given up longer than KEEP_DONE ago; returns how many."""
    with transaction(ctx.sessions) as session:
        result = session.execute(
            delete(NotificationOutbox).where(
                NotificationOutbox.state.in_([SENT, FAILED]), NotificationOutbox.updated_at < func.now() - KEEP_DONE
            )
        )
    return rowcount(result)


def backoff(attempts: int) -> float:
    """Seconds before the next attempt: 1, 2, 4 ... capped at BACKOFF_MAX, with jitter."""
    return min(BACKOFF_MAX, 2.0 ** max(0, attempts - 1)) * random.uniform(0.5, 1.0)


def send(ctx: NotifyContext, outbox_id: int) -> str:
    """One attempt at a claimed row; records the outcome and says what happened."""
    with ctx.sessions() as session:
        row = session.get(NotificationOutbox, outbox_id)
        if row is None or row.state != SENDING:
            return "nothing to do: not claimed"
        kind, build_id, attempts = row.kind, row.build_id, row.attempts
        webhook_id, event, event_id, body = row.webhook_id, row.event, row.event_id, row.body
    try:
        if kind == STATUS:
            result = statuses.set_commit_status(ctx, build_id)
        elif kind == WEBHOOK and webhook_id is not None:
            result = webhooks.deliver(ctx, webhook_id, event, str(event_id), body or "", redelivery=attempts > 1)
        else:
            result = f"failed: unknown notification kind {kind!r}"
    except RETRYABLE as exc:
        error = f"{type(exc).__name__}: {exc}"
        if attempts >= MAX_ATTEMPTS.get(kind, 1):
            _finish(ctx, outbox_id, FAILED, f"given up after {attempts} attempts: {error}")
            log.error("build %s: %s %s given up after %s attempts: %s", build_id, kind, event, attempts, error)
            return f"failed: {error}"
        delay = backoff(attempts)
        _finish(ctx, outbox_id, PENDING, error, due_in=delay)
        log.warning("build %s: %s %s failed (%s); trying again in %.0fs", build_id, kind, event, error, delay)
        return f"retry: {error}"
    except Exception as exc:  # a bug: keep the reason on the row rather than retry it for hours
        log.exception("build %s: %s %s", build_id, kind, event)
        _finish(ctx, outbox_id, FAILED, f"{type(exc).__name__}: {exc}")
        return f"failed: {exc}"
    if result.startswith("failed"):
        _finish(ctx, outbox_id, FAILED, result)
    else:
        _finish(ctx, outbox_id, SENT, None)
    return result


def _finish(ctx: NotifyContext, outbox_id: int, state: str, error: str | None, *, due_in: float | None = None, tries: int = 20) -> None:
    """Record an attempt's outcome; the database may be restarting, and forgetting means sending again."""
    values: dict[str, Any] = {"state": state, "error": error, "updated_at": func.now()}
    if state == SENT:
        values["sent_at"] = func.now()
    if due_in is not None:
        values["due_at"] = func.now() + dt.timedelta(seconds=due_in)
    query = update(NotificationOutbox).where(NotificationOutbox.id == outbox_id, NotificationOutbox.state == SENDING)
    for attempt in range(tries):
        try:
            with transaction(ctx.sessions) as session:
                session.execute(query.values(**values))
            return
        except SQLAlchemyError as exc:
            if attempt == tries - 1:
                log.error("notification %s: outcome %s not recorded (%s); it is sent again later", outbox_id, state, exc)
                return
            time.sleep(min(2.0, 0.1 * 2**attempt))


class Dispatcher:
    """The thread of a worker's main process that sends due outbox rows on SENDERS threads of its own."""

    def __init__(self, ctx: NotifyContext, interval: float = POLL_INTERVAL, senders: int = SENDERS) -> None:
        self.ctx = ctx
        self.interval = interval
        self.senders = senders
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="notify-send")
        self._thread = threading.Thread(target=self._run, name="notify-dispatch", daemon=True)
        self._failing: str | None = None
        self._pruned_at: float | None = None  # prune on the first pass

    def start(self) -> "Dispatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._pass()
            self._wake.wait(self.interval)
            self._wake.clear()

    def _pass(self) -> None:
        with self._busy_lock:
            free = self.senders - self._busy
        if free <= 0:
            return
        try:
            ids = claim_due(self.ctx, free)
        except SQLAlchemyError as exc:
            reason = str(exc).splitlines()[0]
            if self._failing != reason:  # once per outage, not every second
                log.warning("notification outbox unavailable: %s", reason)
            self._failing = reason
            return
        if self._failing is not None:
            log.info("notification outbox available again")
            self._failing = None
        if self._pruned_at is None or time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            try:
                prune(self.ctx)
            except SQLAlchemyError as exc:
                log.warning("notification outbox: cannot delete old rows: %s", str(exc).splitlines()[0])
        for outbox_id in ids:
            with self._busy_lock:
                self._busy += 1
            self._pool.submit(self._send, outbox_id)

    def _send(self, outbox_id: int) -> None:
        try:
            send(self.ctx, outbox_id)
        except Exception:
            log.exception("notification %s", outbox_id)
        finally:
            with self._busy_lock:
                self._busy -= 1
            self._wake.set()  # a sender is free: look for more at once
