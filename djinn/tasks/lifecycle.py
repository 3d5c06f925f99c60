"""Worker start-up and shutdown: the Celery signals around the build tasks."""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown

from djinn import context

log = logging.getLogger(__name__)
_reaper = None


@worker_ready.connect
def on_worker_ready(**_) -> None:
    """Clean up after dead builds, then keep watching for builds whose worker died."""
    global _reaper
    from djinn.reaper import Reaper, sweep_leftovers

    ctx = context.current()
    try:
        sweep_leftovers(ctx)
    except Exception as exc:  # a sweep that fails must not keep the worker from running builds
        log.warning("start-up sweep failed: %s", exc)
    _reaper = Reaper(ctx).start()


@worker_shutdown.connect
def on_worker_shutdown(**_) -> None:
    if _reaper is not None:
        _reaper.stop()
