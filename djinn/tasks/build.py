"""The build task: the Celery edge around djinn.execute.run_build."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from djinn import context
from djinn.execute import run_build
from djinn.queue import RUN_BUILD

_reaper = None


@shared_task(name=RUN_BUILD, acks_late=True, ignore_result=True)
def run_build_task(build_id: int) -> str | None:
    """Run one build, given only its id: everything else is read from the database."""
    status = run_build(context.current(), int(build_id))
    return status.value if status is not None else None


@worker_ready.connect
def start_reaper(**_) -> None:
    global _reaper
    from djinn.reaper import Reaper, sweep_leftovers

    ctx = context.current()
    try:
        sweep_leftovers(ctx)
    except Exception as exc:  # a sweep that fails must not keep the worker from running builds
        logging.getLogger(__name__).warning("start-up sweep failed: %s", exc)
    _reaper = Reaper(ctx).start()


@worker_shutdown.connect
def stop_reaper(**_) -> None:
    if _reaper is not None:
        _reaper.stop()
