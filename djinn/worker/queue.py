"""The build queue: Celery on a Redis broker, one queue per driver, a task per build."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from celery import Celery

from djinn.config import RedisSettings, WorkerConfig
from djinn.db.models import Build
from djinn.db.submit import queue_of

CONFIG_ENV = "DJINN_WORKER_CONFIG"
DRIVER_CONFIG_ENV = "DJINN_DRIVER_CONFIG"
RUN_BUILD = "djinn.run_build"


def redis_url(settings: RedisSettings, db: int = 0) -> str:
    auth = f":{quote(settings.password, safe='')}@" if settings.password else ""
    return f"redis://{auth}{settings.addr}/{db}"


def celery_settings(config: WorkerConfig) -> dict[str, Any]:
    """Celery settings for a worker config.

    A build must never run twice at once, nor be lost. Celery alone cannot promise
    either (the Redis transport re-delivers an unacknowledged message once the
    visibility timeout passes, even while the first delivery still runs), so the
    database row is the lease (djinn.db.lease) and Celery is set to stay out of its way:
    - acks_late: the message is acknowledged when the build is over, so a worker
      that dies before claiming the build leaves the message to be re-delivered;
    - visibility_timeout: longer than any build may run, so a re-delivery happens
      only for a worker that died; the claim drops a re-delivered build that is
      running or finished (one whose worker died is queued again by the reaper);
    - reject_on_worker_lost off: a pool process that dies does not bounce its
      message straight back; the lease reaper notices the stale heartbeat and
      queues the build again, counting the attempt;
    - prefetch_multiplier 1: a worker reserves only builds it can start now, so
      queued builds go to whichever host is free.
    """
    timeout = int(config.timeout.total_seconds())
    return {
        "broker_url": redis_url(config.redis),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {"visibility_timeout": timeout + 3600},
        "task_default_queue": config.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_concurrency": config.resolved_parallelism,
        "task_routes": {RUN_BUILD: {"queue": config.queue}},
        "imports": ["djinn.tasks.build", "djinn.tasks.lifecycle"],
    }


def make_app(config: WorkerConfig | None = None) -> Celery:
    """A Celery app; without a config it reads `celeryconfig` (DJINN_WORKER_CONFIG) when first used."""
    app = Celery("djinn")
    if config is None:
        app.config_from_object("celeryconfig")
    else:
        app.conf.update(celery_settings(config))
    return app


def config_paths() -> tuple[str, str]:
    return os.environ.get(CONFIG_ENV, "djinn-worker.conf"), os.environ.get(DRIVER_CONFIG_ENV, "djinn-driver.conf")


def enqueue(app: Celery, build_id: int, queue: str, host: str | None = None) -> None:
    """Put build `build_id` on `queue`; the task loads everything else from the database.

    `host` is the Djinn server a curlyq job came from (its payload's Host): the
    failure mail links there instead of the config's `host`.

    Uses the app's pooled producer connection; when the broker is down it fails after
    Celery's short publish retry policy rather than hanging.
    """
    app.send_task(
        RUN_BUILD,
        args=[build_id],
        kwargs={"host": host} if host else {},
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5},
    )


def requeue(app: Celery, build: Build) -> None:
    """Queue a build again (reaped, handed back, or received by a stopping worker), on its own queue."""
    enqueue(app, build.id, queue_of(build))
