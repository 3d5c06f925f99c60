"""Keeping the database and the broker in step (SPEC section 5): orphans and lost messages.

Every worker runs a reaper in its main process. Each pass:

- reaps: a running build whose heartbeat is older than `stale_after` belongs to a
  dead (or frozen) worker; it is reset and queued again, or failed after
  MAX_ATTEMPTS. The row lock taken with SKIP LOCKED lets several reapers share
  the work without requeueing a build twice.
- reconciles (every `orphan_timeout`): the database, not Redis, says what must
  run. A build `queued` for longer than `orphan_timeout` whose message is nowhere
  in the broker (Redis restarted empty, a message dropped, or held by a consumer
  that died before claiming it) is queued again.

Why reconciliation cannot make a build run twice, and does not flood a backlog:
the claim takes only a `queued` build, in one UPDATE (djinn.db.lease), so an extra
message for a build that is running or finished is dropped when it arrives. A
build is queued again only when no message for it is waiting in its queue's
Redis list and none was delivered in the last `orphan_timeout` (kombu's
`unacked` hash and its delivery times), and one reconciler at a time scans (a
Redis lock). A long backlog whose messages are all waiting gets nothing added.
An extra message can still be sent in rare races (a message between BRPOP and
the unacked hash during the scan; a dead consumer's message that kombu restores
after its visibility timeout): it costs a delivery, never a run.

Outage grace: a worker whose beats could not land while PostgreSQL was away is
alive, and beats again within moments of the database's return. So a reaper
acts only once it has seen the database answer steadily for `stale_after`: after
a failed pass, after a gap between passes (this process was frozen) and after
start-up. Workers whose runs fenced themselves meanwhile stay stale and are reaped.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from typing import Any, Iterable, Iterator, cast

import redis
from sqlalchemy import func, select

from djinn.config import driver_kind
from djinn.db.engine import is_unavailable, transaction
from djinn.db.lease import MAX_ATTEMPTS, abandon, orphans, reset_for_rerun
from djinn.db.models import Build, BuildDriver
from djinn.db.submit import queue_for
from djinn.observe import metrics
from djinn.periodic import Periodic
from djinn.status import Status
from djinn.worker.context import WorkerContext
from djinn.worker.curlyq import pending_builds
from djinn.worker.kill import redis_client
from djinn.worker.queue import RUN_BUILD, enqueue, requeue

log = logging.getLogger(__name__)

#: Redis key of the lock one reconciler holds while it scans and requeues.
RECONCILE_LOCK = "djinn:reconcile"
#: At most this many queued builds are looked at per pass; the next pass takes the rest.
RECONCILE_BATCH = 1000
#: kombu's Redis transport: a queue's messages, by priority, and the delivered-but-unacknowledged ones.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
SCAN_CHUNK = 500


def reap(ctx: WorkerContext) -> list[int]:
    """Requeue (or, after MAX_ATTEMPTS, fail) every orphaned build; returns their ids."""
    done = []
    with transaction(ctx.sessions) as session:
        for build in orphans(session, ctx.stale_after):
            dead_worker = build.worker
            reset_for_rerun(session, build, ctx.artifacts)
            if build.attempt >= MAX_ATTEMPTS:
                abandon(session, build, f"the build was started {build.attempt} times and each worker running it died; giving up")
                log.error("build %s: abandoned after %s attempts", build.id, build.attempt)
            else:
                # Sent before the commit: if the broker is down the reset is rolled back
                # and the next pass tries again. A duplicate message is dropped by the claim.
                requeue(ctx.app, build)
                log.warning("build %s: worker %s stopped beating; queued again", build.id, dead_worker)
            done.append(build.id)
    return done


def message_build_id(raw: bytes | str | dict[str, Any]) -> int | None:
    """The build id of a Celery build-task message as kombu stores it in Redis, or None for any other message."""
    try:
        message = raw if isinstance(raw, dict) else json.loads(raw)
        if (message.get("headers") or {}).get("task") != RUN_BUILD:
            return None
        body = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _waiting(client: redis.Redis, queue: str) -> Iterator[int]:
    for key in (queue + suffix for suffix in PRIORITY_SUFFIXES):
        start = 0
        while chunk := client.lrange(key, start, start + SCAN_CHUNK - 1):
            for raw in chunk:
                if (build_id := message_build_id(raw)) is not None:
                    yield build_id
            start += len(chunk)


def _recently_delivered(client: redis.Redis, within: float) -> Iterator[int]:
    """Builds whose message a consumer took less than `within` seconds ago and has not acknowledged."""
    # A consumer that has held a message longer without claiming its build is gone (or frozen).
    scored = cast(list[tuple[bytes, float]], client.zrangebyscore(UNACKED_INDEX, time.time() - within, "+inf", withscores=True))
    tags = [tag for tag, _ in scored]
    for start in range(0, len(tags), SCAN_CHUNK):
        for entry in client.hmget(UNACKED, tags[start:start + SCAN_CHUNK]):
            try:
                message = json.loads(entry)[0] if entry is not None else None
            except (ValueError, IndexError, TypeError):
                continue
            if message is not None and (build_id := message_build_id(message)) is not None:
                yield build_id


def in_broker(client: redis.Redis, queues: Iterable[str], delivered_within: float) -> set[int]:
    """Ids of the builds that have a message waiting in `queues` (Celery's or curlyq's) or recently delivered."""
    present: set[int] = set()
    for queue in queues:
        present.update(_waiting(client, queue))
        present.update(pending_builds(client, queue))  # the Djinn server's own queue beside Celery's
    present.update(_recently_delivered(client, delivered_within))
    return present


def _queued_before(ctx: WorkerContext, ids: list[int] | None = None) -> list[tuple[int, str]]:
    """Queued builds older than orphan_timeout (or those of `ids` still queued), with their queue."""
    query = select(Build.id, BuildDriver.type, BuildDriver.config).join(BuildDriver, BuildDriver.build_id == Build.id)
    query = query.where(Build.status == Status.QUEUED)
    if ids is None:
        query = query.where(Build.created_at < func.now() - ctx.config.orphan_timeout).order_by(Build.id).limit(RECONCILE_BATCH)
    else:
        query = query.where(Build.id.in_(ids))
    with ctx.sessions() as session:
        return [(build_id, queue_for(type_, config or {})) for build_id, type_, config in session.execute(query)]


def reconcile(ctx: WorkerContext) -> list[int]:
    """Queue again the queued builds that have no message in the broker; returns their ids."""
    candidates = _queued_before(ctx)
    if not candidates:
        return []
    window = ctx.config.orphan_timeout.total_seconds()
    client = redis_client(ctx.config.redis, socket_connect_timeout=5, socket_timeout=30)
    token = uuid.uuid4().hex
    if not client.set(RECONCILE_LOCK, token, nx=True, px=int(max(window, 5.0) * 2000)):
        return []  # another worker's reaper is at it
    try:
        present = in_broker(client, {queue for _, queue in candidates}, window)
        missing = [build_id for build_id, _ in candidates if build_id not in present]
        if not missing:
            return []
        requeued = []
        for build_id, queue in _queued_before(ctx, missing):  # claimed or killed since the first look: left alone
            enqueue(ctx.app, build_id, queue)
            requeued.append(build_id)
        if requeued:
            log.warning(
                "%d queued build%s had no message in the broker (Redis restarted empty, or a consumer died); "
                "queued again: %s",
                len(requeued), "" if len(requeued) == 1 else "s", ", ".join(map(str, requeued[:20])),
            )
        return requeued
    finally:
        if client.get(RECONCILE_LOCK) == token.encode():
            client.delete(RECONCILE_LOCK)
        client.close()


def sweep_leftovers(ctx: WorkerContext) -> list[str]:
    """At start-up: remove what builds no live worker runs left behind in the driver.

    docker: containers and volumes of builds not running with a fresh heartbeat
    (the engine may be shared by several hosts); os: build directories and the
    processes still running in them, qemu: VMs and their overlay directories,
    each when the worker process that made them is gone (djinn.drivers.leftovers),
    and saved qemu machine states over their bound.
    """
    kind = driver_kind(ctx.config.driver)
    # Each driver module loads its own client library (docker, paramiko): only this worker's is imported.
    if kind == "docker":
        from djinn.drivers.docker import sweep

        with ctx.sessions() as session:
            live = {str(b.id) for b in session.scalars(
                select(Build).where(Build.status == Status.RUNNING, Build.heartbeat_at >= func.now() - ctx.stale_after)
            )}
        removed = sweep(ctx.drivers.settings_for("docker"), keep=live)
    elif kind == "os":
        from djinn.drivers.os import sweep as sweep_os  # as above: this worker's driver only

        removed = sweep_os()
    elif kind == "qemu":
        from djinn.drivers.qemu import sweep as sweep_qemu  # as above (paramiko)

        removed = sweep_qemu(settings=ctx.drivers.settings_for("qemu"))
    else:
        return []
    for item in removed:
        log.warning("removed leftover %s of a build that no longer runs", item)
    return removed


class Reaper:
    """The reaper thread of a worker's main process: reap every pass, reconcile every orphan_timeout."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.interval = ctx.reaper_interval
        self.grace = ctx.stale_after.total_seconds()
        self.reconcile_every = ctx.config.orphan_timeout.total_seconds()
        self._steady_since: float | None = None
        self._last_ok: float | None = None
        self._last_reconcile = 0.0
        self._periodic = Periodic("reaper", self.interval, self.run_pass, on_error=metrics.error)

    def start(self) -> "Reaper":
        self._periodic.start()
        return self

    def stop(self) -> None:
        self._periodic.stop()

    def run_pass(self) -> None:
        started = time.monotonic()
        # A gap this long may hide a database outage (or this process was frozen): start the grace anew.
        if self._last_ok is None or started - self._last_ok > max(self.grace / 2, 2 * self.interval):
            self._steady_since = None
        try:
            with self.ctx.sessions() as session:
                session.execute(select(1))
        except Exception:
            self._steady_since = None
            raise
        if self._steady_since is None:
            self._steady_since = started
            log.info("reaper: waiting %.1fs of steady database before taking builds over", self.grace)
        self._last_ok = time.monotonic()
        if self._last_ok - self._steady_since < self.grace:
            return
        try:
            reap(self.ctx)
        except Exception as exc:
            if is_unavailable(exc):
                self._steady_since = None
            raise
        self._last_ok = time.monotonic()
        if self._last_ok - self._last_reconcile >= self.reconcile_every:
            reconcile(self.ctx)
            self._last_reconcile = self._last_ok = time.monotonic()
