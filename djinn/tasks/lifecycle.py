"""Worker start-up and shutdown: the Celery signals around the build tasks.

- setup_logging: the worker's own structured log (djinn.observe.logs) replaces Celery's;
- worker_init (main process, before the pool forks): the metrics listener,
  and SIGUSR2 writing every thread's stack to standard error (also in each pool process);
- task_failure: a task that could not do its work counts as a worker error;
- worker_process_init (each pool process): its SIGTERM will hand its build
  back (djinn.worker.shutdown);
- worker_process_shutdown (each pool process, as it exits): the build
  directories it handed to be removed are gone first (djinn.drivers.scratch);
- worker_ready: start-up sweep, the reaper, the consumer of the Djinn server's
  curlyq queue (djinn.worker.curlyq), and the main process's signals (first
  SIGTERM/SIGINT drains, the second hands builds back, SIGHUP reopens);
- worker_shutting_down (the drain starts): the curlyq consumer stops taking jobs;
- worker_shutdown: the curlyq consumer, the reaper and the listener stop.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (
    setup_logging,
    task_failure,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from djinn.drivers.scratch import SCRATCH
from djinn.observe import logs, metrics
from djinn.worker import context, shutdown
from djinn.worker.curlyq import start_for_worker
from djinn.worker.health import HealthChecker
from djinn.worker.reaper import Reaper, sweep_leftovers

log = logging.getLogger(__name__)
_reaper = None
_controller = None
_curlyq = None


@setup_logging.connect
def on_setup_logging(**_: Any) -> None:
    """Log lines as djinn.observe.logs writes them, to the config's `log` file at its level."""
    config = context.current().config
    logs.setup(config.log.level, config.log.file)


@worker_init.connect
def on_worker_init(sender: Any = None, **_: Any) -> None:
    global _controller
    _controller = sender
    logs.dump_stacks_on_signal()
    try:
        config = context.current().config
        metrics.start(config, HealthChecker(config).check, shutdown.phase)  # a no-op when djinn-worker started it already
    except Exception as exc:  # `celery -A djinn worker`: run without metrics rather than not at all
        log.error("metrics: %s", exc)


@worker_process_init.connect
def on_worker_process_init(**_: Any) -> None:
    shutdown.mark_pool_process()
    logs.dump_stacks_on_signal()


@worker_process_shutdown.connect
def on_worker_process_shutdown(**_: Any) -> None:
    # A pool process ends with os._exit: atexit handlers do not run there.
    if not SCRATCH.drain(30):
        log.warning("build directories still being removed at exit; the next start-up sweep removes them")


@worker_ready.connect
def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Clean up after dead builds, keep watching for builds whose worker died, take over the signals."""
    global _reaper, _curlyq
    ctx = context.current()
    try:
        sweep_leftovers(ctx)
    except Exception as exc:  # a sweep that fails must not keep the worker from running builds
        log.warning("start-up sweep failed: %s", exc)
    _reaper = Reaper(ctx).start()
    try:
        _curlyq = start_for_worker(ctx)
    except Exception as exc:  # Celery builds still run; the server's queue waits for a restart
        log.error("cannot consume the curlyq queue %s: %s", ctx.config.queue, exc)
    shutdown.MainSignals(_controller or getattr(sender, "controller", None)).install()


@task_failure.connect
def on_task_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    """Counted in djinn_errors_total unless the task says the exception is its expected result."""
    metrics.task_failed(sender, exception)


@worker_shutting_down.connect
def on_worker_shutting_down(**_: Any) -> None:
    """Draining takes no new builds from the server's queue either: they stay there for other workers."""
    global _curlyq
    if _curlyq is not None:
        consumer, _curlyq = _curlyq, None
        consumer.stop()


@worker_shutdown.connect
def on_worker_shutdown(**_: Any) -> None:
    on_worker_shutting_down()
    if _reaper is not None:
        _reaper.stop()
    metrics.stop()
