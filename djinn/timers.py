"""One thread per process that calls functions when their time comes.

A build needs a few things done later, and usually never: its timeout, its
driver's creation timeout, its first heartbeat, its recorder's first write. A
thread each would cost more than a short build takes to run, so they all wait
here, on one thread, as entries of a heap ordered by the monotonic clock. A
function that is quick (set a flag, start a thread) runs on that thread; one
that may block (stop a driver) is given `blocking=True` and gets a thread of
its own when it fires. After a process was frozen (SIGSTOP) every entry whose
time passed fires as soon as it runs again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

#: Cancelled entries are dropped from the heap once there are this many (and they are the majority).
COMPACT_AFTER = 64


class Timer:
    """A call waiting for its time; `cancel` keeps it from happening."""

    __slots__ = ("when", "action", "blocking", "cancelled", "_timers")

    def __init__(self, timers: Timers, when: float, action: Callable[[], object], blocking: bool) -> None:
        self.when = when
        self.action = action
        self.blocking = blocking
        self.cancelled = False
        self._timers = timers

    def cancel(self) -> None:
        """The call will not happen (unless it already began)."""
        if not self.cancelled:
            self.cancelled = True
            self._timers._cancelled()


class Timers:
    def __init__(self) -> None:
        self._order = itertools.count()
        self._forked()
        # A forked child (a Celery pool process) starts empty: the thread and the entries are the
        # parent's, and so may be the lock, held by the parent's thread at the moment of the fork.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Timer]] = []
        self._dropped = 0
        self._running = False

    def call_at(self, when: float, action: Callable[[], object], *, blocking: bool = False) -> Timer:
        """Call `action` at monotonic time `when`."""
        timer = Timer(self, when, action, blocking)
        with self._cond:
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name="timers", daemon=True).start()
            heapq.heappush(self._heap, (when, next(self._order), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()  # earlier than what the thread waits for
        return timer

    def call_later(self, delay: float, action: Callable[[], object], *, blocking: bool = False) -> Timer:
        """Call `action` in `delay` seconds."""
        return self.call_at(time.monotonic() + delay, action, blocking=blocking)

    def pending(self) -> int:
        """Entries not cancelled that wait for their time (for tests)."""
        with self._cond:
            return sum(not timer.cancelled for _, _, timer in self._heap)

    def _cancelled(self) -> None:
        with self._cond:
            self._dropped += 1
            if self._dropped >= COMPACT_AFTER and self._dropped * 2 >= len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._dropped = 0

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        self._dropped = max(self._dropped - 1, 0)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    left = self._heap[0][0] - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                timer = heapq.heappop(self._heap)[2]
                timer.cancelled = True  # it happens now: a late cancel has nothing to stop
            if timer.blocking:
                threading.Thread(target=self._call, args=(timer,), name="timer-call", daemon=True).start()
            else:
                self._call(timer)

    @staticmethod
    def _call(timer: Timer) -> None:
        try:
            timer.action()
        except Exception:  # one failing call must not stop the others
            log.exception("timer call %r failed", timer.action)


#: The process's timers.
TIMERS = Timers()
