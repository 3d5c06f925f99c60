"""The sweep that keeps failure mail from being lost (see djinn.notify.mail for the states).

Every worker with an `smtp` block runs it in its main process. Each pass:
- owes a mail for every build that ended failed/killed/timed_out in the last
  HORIZON but has no mail row: its worker died between the build's final write
  and the failure hook, or the build was abandoned after too many attempts
  (djinn.db.lease), which no build task reports;
- gives `sending` rows whose sender died (older than SENDING_STALE) back to pending;
- queues a send for pending rows nobody has touched for PENDING_STALE (their
  task was lost: broker restart, dead worker holding the retry).
Rows are locked with SKIP LOCKED, so several workers share the work.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, or_, select, text, update

from djinn.db.engine import transaction
from djinn.db.models import BuildNotification
from djinn.notify.common import SEND_FAILURE_MAIL, NotifyContext, log, send_task
from djinn.notify.mail import MAIL, PENDING, SENDING
from djinn.observe import metrics
from djinn.periodic import Periodic

INTERVAL = 10.0
# Only builds finished this long ago: the failure hook of a live worker comes first.
GRACE = dt.timedelta(seconds=30)
HORIZON = dt.timedelta(days=1)
# Longer than the task's retry backoff cap, so a live retry chain is never doubled.
PENDING_STALE = dt.timedelta(seconds=60)
# Longer than any SMTP conversation can last.
SENDING_STALE = dt.timedelta(minutes=10)


def sweep(ctx: NotifyContext) -> list[int]:
    """One pass; returns the ids of the builds whose mail it queued."""
    if ctx.config.smtp is None:
        return []
    queued: list[int] = []
    with transaction(ctx.sessions) as session:
        owed = session.scalars(
            text(
                """
                INSERT INTO build_notifications (build_id, kind, state)
                SELECT b.id, :kind, :pending FROM builds b
                WHERE b.status IN ('failed', 'killed', 'timed_out')
                  AND b.finished_at > now() - :horizon AND b.finished_at < now() - :grace
                  AND NOT EXISTS (SELECT 1 FROM build_notifications n WHERE n.build_id = b.id AND n.kind = :kind)
                ON CONFLICT (build_id, kind) DO NOTHING
                RETURNING build_id
                """
            ).bindparams(kind=MAIL, pending=PENDING, horizon=HORIZON, grace=GRACE)
        ).all()
        session.execute(
            update(BuildNotification)
            .where(
                BuildNotification.kind == MAIL,
                BuildNotification.state == SENDING,
                BuildNotification.updated_at < func.now() - SENDING_STALE,
            )
            .values(state=PENDING, error="the worker sending it stopped; sending again", updated_at=func.now() - PENDING_STALE)
        )
        rows = session.scalars(
            select(BuildNotification)
            .where(
                BuildNotification.kind == MAIL,
                BuildNotification.state == PENDING,
                BuildNotification.created_at > func.now() - HORIZON,
                or_(BuildNotification.updated_at <= func.now() - PENDING_STALE, BuildNotification.build_id.in_(owed)),
            )
            .order_by(BuildNotification.id)
            .limit(100)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            # Queued before the commit: if the broker is away, the next pass tries again.
            send_task(ctx, SEND_FAILURE_MAIL, row.build_id)
            row.updated_at = func.now()
            queued.append(row.build_id)
    for build_id in queued:
        log.warning("build %s: failure mail was owed and not on its way; queued it", build_id)
    return queued


def Sweeper(ctx: NotifyContext, interval: float = INTERVAL) -> Periodic:
    """The mail sweep thread of a worker's main process."""
    return Periodic("mail-sweep", interval, lambda: sweep(ctx), on_error=metrics.error)
