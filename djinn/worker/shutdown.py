"""Stopping a worker without losing or cutting builds: drain first, hand back second.

The contract (SPEC section 10 and dist/):
- the first SIGTERM or SIGINT stops the worker taking builds; the builds it runs
  go on to their end, then it exits 0;
- a second one (systemd sends it when the unit's stop timeout expires, the
  SysVinit script after its drain wait) stops the running builds, destroys
  their drivers and hands them back: each is reset to `queued` exactly as it
  was submitted and queued again for another worker. A hand-back is not a
  crash: the attempt is not counted and the build is not tagged `orphaned`.
- SIGHUP reopens the log file (logrotate); pool processes reopen it by
  themselves when it was moved (djinn.observe.logs).

How it fits Celery's prefork pool. Celery's own handlers are replaced once the
worker is ready (Celery treats a second SIGTERM as nothing and SIGHUP as
"re-exec the worker"). The first signal asks Celery for its warm shutdown,
which stops consuming and waits for the pool. The builds run in pool processes,
so on the second signal the main process sends SIGTERM to each of them; a pool
process that runs a build hands it back and returns normally, one that is idle
exits as it always did on SIGTERM. Celery's cold shutdown (SIGQUIT) also ends
pool processes with SIGTERM, so it hands builds back too. With the solo or
threads pool the builds run in the main process and are handed back there.

Signal handlers only set flags and put an event on a queue (SimpleQueue.put is
safe in a signal handler); a thread per process does the work, so a handler
never takes a lock that the interrupted code may hold.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from typing import Any, Callable

from celery import signals as celery_signals
from celery.worker import state as celery_state

from djinn.db.engine import transaction
from djinn.db.lease import Lease, held, reset_for_rerun
from djinn.db.models import Build
from djinn.observe import logs
from djinn.runner import control
from djinn.runner.control import Stop
from djinn.status import Status
from djinn.worker.context import WorkerContext
from djinn.worker.queue import requeue

log = logging.getLogger(__name__)

RUNNING = "running"
DRAINING = "draining"
HANDING_BACK = "handing_back"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def running_builds() -> list[int]:
    return [run.build_id for run in control.runs() if run.build_id is not None]


def request_hand_back() -> list[int]:
    """Hand back every build this process runs now; returns their ids."""
    handed = []
    for run in control.runs():
        if not run.requested(Stop.HANDED_BACK):
            log.warning("build %s: the worker is stopping: handing the build back to be run by another worker", run.build_id)
        run.stop(Stop.HANDED_BACK)
        if run.build_id is not None:
            handed.append(run.build_id)
    return handed


# -- the per-process event thread -------------------------------------------------

_events: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
_dispatcher_pid: int | None = None
_phase = RUNNING
_handlers: dict[str, Callable[..., object]] = {}


def phase() -> str:
    """running, draining (first stop signal seen) or handing_back (second one)."""
    return _phase


def _start_dispatcher() -> None:
    global _dispatcher_pid, _events
    if _dispatcher_pid == os.getpid():
        return
    _events = queue.SimpleQueue()  # a queue inherited through fork may hold the parent's events
    _dispatcher_pid = os.getpid()
    threading.Thread(target=_dispatch, args=(_events,), name="signals", daemon=True).start()


def _dispatch(events: "queue.SimpleQueue[tuple[Any, ...]]") -> None:
    while True:
        name, *args = events.get()
        try:
            _handlers[name](*args)
        except Exception:  # one failed action must not stop the next signal from being handled
            log.exception("handling %s failed", name)


def _reopen_logs() -> None:
    logs.reopen()


# -- pool processes ----------------------------------------------------------------

_in_pool = False
_child_handlers_pid: int | None = None
_previous_term: Any = None


def mark_pool_process() -> None:
    """Called in each pool process as it starts (worker_process_init)."""
    global _in_pool
    _in_pool = True
    _handlers["hand_back"] = request_hand_back
    _start_dispatcher()


def take_over_sigterm() -> None:
    """Take over SIGTERM in a pool process, from the thread that runs builds.

    Not at worker_process_init: billiard installs its own handlers for SIGTERM
    and SIGHUP after that signal (its `_shutdown_cleanup`, which exits), so ours
    are put in place when the process starts its first build. Its log needs no
    SIGHUP: djinn.observe.logs' handler reopens a file that was moved away.
    """
    global _child_handlers_pid, _previous_term
    if not _in_pool or _child_handlers_pid == os.getpid():
        return
    if threading.current_thread() is not threading.main_thread():
        return
    _previous_term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _child_sigterm)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a HUP sent to the whole group must not end a build
    _child_handlers_pid = os.getpid()


def _child_sigterm(signum: int, frame: Any) -> None:
    if not control.runs():
        # Idle: end the way a pool process ends on SIGTERM (billiard's handler, or the default).
        if callable(_previous_term):
            _previous_term(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _events.put(("hand_back",))


# -- the main process ------------------------------------------------------------


class MainSignals:
    """The worker's main process: first stop signal drains, the second hands back, SIGHUP reopens logs."""

    def __init__(self, worker: Any = None) -> None:
        self.worker = worker  # Celery's WorkController, for the pool's processes
        self.count = 0
        self._state: Any = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("signal handlers not installed: not in the main thread")
            return
        self._state = celery_state
        _handlers["stop"] = self._on_stop
        _handlers["hup"] = self._on_hup
        _start_dispatcher()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._signal)
        signal.signal(signal.SIGHUP, self._signal)

    def _signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            _events.put(("hup",))
            return
        self.count += 1
        if self.count == 1 and self._state is not None:
            self._state.should_stop = 0  # Celery's warm shutdown, exit status 0
        _events.put(("stop", signum, self.count))

    def pool_pids(self) -> list[int]:
        try:
            return [p.pid for p in self.worker.pool._pool._pool if p.pid]
        except AttributeError:  # solo/threads pool, or the pool is gone already
            return []

    def _on_stop(self, signum: int, count: int) -> None:
        global _phase
        name = signal.Signals(signum).name
        if count == 1:
            _phase = DRAINING
            busy = _active_requests()
            log.warning(
                "%s: graceful shutdown: taking no new builds, waiting for %d running build%s to finish "
                "(send SIGTERM or SIGINT again to hand them back to other workers)",
                name, busy, "" if busy == 1 else "s",
            )
            try:
                hostname = getattr(self.worker, "hostname", None)
                celery_signals.worker_shutting_down.send(sender=hostname, sig=name, how="Warm", exitcode=0)
            except Exception:  # a receiver's error must not stop the shutdown
                log.exception("worker_shutting_down receivers failed")
            return
        first = _phase != HANDING_BACK
        _phase = HANDING_BACK
        pids = self.pool_pids()
        if first:
            log.warning("%s again: stopping the running builds and handing them back", name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        request_hand_back()

    def _on_hup(self) -> None:
        _reopen_logs()
        log.info("SIGHUP: log file reopened")


def _active_requests() -> int:
    try:
        return len(celery_state.active_requests)
    except Exception:
        return len(control.runs())


# -- giving a build back -------------------------------------------------------


def hand_back(ctx: WorkerContext, lease: Lease) -> bool:
    """Put a build this worker holds back to `queued` and on its queue, for another worker.

    The attempt the claim counted is given back (a stopping worker is not a dying
    one) and no `orphaned` tag is added. The message is sent inside the
    transaction: if the broker cannot take it nothing changes, the build stays
    running on a lease that nobody renews, and the reaper of another worker
    queues it once the lease is stale (that path does count an attempt).
    Returns whether the build was handed back.
    """
    try:
        with transaction(ctx.sessions) as session:
            if not held(session, lease):
                log.error("build %s: lease lost before the hand-back; another worker owns the build", lease.build_id)
                return False
            build = session.get(Build, lease.build_id)
            if build is None:
                log.error("build %s: gone from the database before the hand-back", lease.build_id)
                return False
            reset_for_rerun(session, build, ctx.artifacts, orphaned=False)
            requeue(ctx.app, build)
    except Exception as exc:
        log.error(
            "build %s: could not hand the build back (%s); another worker reruns it once its lease is stale",
            lease.build_id, exc,
        )
        return False
    log.warning("build %s: handed back: queued again for another worker", lease.build_id)
    return True


def requeue_unclaimed(ctx: WorkerContext, build_id: int) -> None:
    """A build this stopping process received but did not start: queue it again so the message is not lost."""
    try:
        with ctx.sessions() as session:
            build = session.get(Build, build_id)
            if build is None or build.status != Status.QUEUED:
                return
            requeue(ctx.app, build)
        log.warning("build %s: the worker is stopping: not started here, queued again", build_id)
    except Exception as exc:
        log.error("build %s: the worker is stopping and could not queue the build again: %s", build_id, exc)
