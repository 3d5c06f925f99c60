"""The process's timers: calls in time order, cancelled ones never, blocking ones off the timers thread."""

from __future__ import annotations

import threading
import time

from waiting import in_forked_child

from djinn.timers import COMPACT_AFTER, Timers


def test_calls_come_in_time_order_and_a_cancelled_one_never():
    timers = Timers()
    heard: list[str] = []
    done = threading.Event()
    timers.call_later(0.3, lambda: (heard.append("last"), done.set()))
    cancelled = timers.call_later(0.1, lambda: heard.append("cancelled"))
    timers.call_later(0.2, lambda: heard.append("second"))
    timers.call_later(0.0, lambda: heard.append("first"))
    cancelled.cancel()
    assert done.wait(10)
    assert heard == ["first", "second", "last"]
    assert timers.pending() == 0


def test_a_blocking_call_runs_on_its_own_thread_and_holds_up_nothing():
    timers = Timers()
    release, quick = threading.Event(), threading.Event()
    threads: dict[str, str] = {}

    def blocking():
        threads["blocking"] = threading.current_thread().name
        release.wait(30)

    timers.call_later(0.0, blocking, blocking=True)
    timers.call_later(0.05, lambda: (threads.setdefault("quick", threading.current_thread().name), quick.set()))
    assert quick.wait(10), "a quick call waited behind a blocking one"
    release.set()
    assert threads == {"blocking": "timer-call", "quick": "timers"}


def test_a_failing_call_does_not_stop_the_ones_after_it():
    timers = Timers()
    after = threading.Event()
    timers.call_later(0.0, lambda: 1 / 0)
    timers.call_later(0.01, after.set)
    assert after.wait(10)


def test_cancelled_entries_do_not_pile_up():
    timers = Timers()
    far = time.monotonic() + 3600
    for _ in range(COMPACT_AFTER * 4):
        timers.call_at(far, lambda: None).cancel()
    assert timers.pending() == 0
    assert len(timers._heap) < COMPACT_AFTER


def test_a_forked_child_has_timers_of_its_own():
    timers = Timers()
    parent = threading.Event()
    timers.call_later(0.0, parent.set)
    assert parent.wait(10)
    timers.call_later(3600, lambda: None)  # the parent's: never the child's

    def child() -> bool:
        fired = threading.Event()
        timers.call_later(0.0, fired.set)
        return fired.wait(10) and timers.pending() == 0

    assert in_forked_child(child) == "passed"
    # Forked while the parent's timers thread held the lock: the child's own lock is free.
    assert in_forked_child(child, while_held=timers._cond) == "passed"
    assert timers.pending() == 1
