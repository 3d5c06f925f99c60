"""Why a run stops, answered in one place, and the runs this process has going.

Four things can stop a build before its jobs are done: a kill (the user), the
build's timeout, the worker handing it back as it stops, and the lease being
lost. Each asks the run's RunControl to stop; the first reason decides the
status the jobs end with, and whoever tears the run down asks the same object
what happened. A hand-back never turns a kill into a rerun.

`running(build_id)` registers a run for as long as it goes: the shutdown code
hands back every registered run, and log lines name the build and job a run is at.
"""

from __future__ import annotations

import enum
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from djinn.status import Status


class Stop(str, enum.Enum):
    KILLED = "killed"
    TIMED_OUT = "timed_out"
    HANDED_BACK = "handed_back"
    LEASE_LOST = "lease_lost"


#: The status the stopped job and the build end with, by the first reason given.
STATUS_OF = {
    Stop.KILLED: Status.KILLED,
    Stop.TIMED_OUT: Status.TIMED_OUT,
    Stop.HANDED_BACK: Status.KILLED,  # the rows are then reset to queued by the hand-back
    Stop.LEASE_LOST: Status.KILLED,  # nothing more is written: another worker owns the build
}


class RunControl:
    """One run's stop requests, in order; listeners (the driver's cancel) hear of the first."""

    def __init__(self, build_id: int | None = None) -> None:
        self.build_id = build_id
        #: The job running now (None between jobs), for log lines.
        self.job: str | None = None
        self._lock = threading.Lock()
        self._reasons: list[Stop] = []
        self._listeners: list[Callable[[], None]] = []

    def stop(self, reason: Stop) -> None:
        """Ask the run to stop (any thread); the first request calls the listeners."""
        with self._lock:
            if reason in self._reasons:
                return
            first = not self._reasons
            self._reasons.append(reason)
            listeners = list(self._listeners) if first else []
        for listener in listeners:
            listener()

    def on_stop(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the first stop request; at once if one was made already."""
        with self._lock:
            self._listeners.append(listener)
            stopped = bool(self._reasons)
        if stopped:
            listener()

    @property
    def reason(self) -> Stop | None:
        """The first reason given, or None while nothing asked the run to stop."""
        with self._lock:
            return self._reasons[0] if self._reasons else None

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    @property
    def status(self) -> Status | None:
        """What the interrupted job and the build end with; None while not stopped."""
        reason = self.reason
        return STATUS_OF[reason] if reason is not None else None

    def requested(self, reason: Stop) -> bool:
        """Whether `reason` was given at all (not necessarily first)."""
        with self._lock:
            return reason in self._reasons

    @property
    def handed_back(self) -> bool:
        """The run stopped because the worker is stopping, and nobody killed it meanwhile."""
        with self._lock:
            return bool(self._reasons) and self._reasons[0] is Stop.HANDED_BACK and Stop.KILLED not in self._reasons

    @property
    def lease_lost(self) -> bool:
        return self.requested(Stop.LEASE_LOST)


_lock = threading.Lock()
_running: dict[int, RunControl] = {}


@contextmanager
def running(build_id: int) -> Iterator[RunControl]:
    """Register a run of `build_id` in this process for as long as the block runs."""
    run = RunControl(build_id)
    with _lock:
        _running[build_id] = run
    try:
        yield run
    finally:
        with _lock:
            if _running.get(build_id) is run:
                del _running[build_id]


def runs() -> list[RunControl]:
    """The runs this process has going now, by build id."""
    with _lock:
        return [_running[build_id] for build_id in sorted(_running)]


def sole() -> RunControl | None:
    """The one run of this process, when it runs exactly one (asked for every log line: no copy, no sort)."""
    with _lock:
        if len(_running) != 1:
            return None
        return next(iter(_running.values()))


def find(build_id: int) -> RunControl | None:
    with _lock:
        return _running.get(build_id)
