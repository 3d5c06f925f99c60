"""The one way the tests wait: poll a condition until it holds, failing with what was awaited."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> T:
    """Poll until `predicate()` is truthy and return its value; fail the test after `timeout` seconds.

    `what` names the awaited event in the failure; a callable is asked then, so the
    message can carry the state at that moment (a log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def in_forked_child(check: Callable[[], bool], *, while_held: threading.Lock | threading.Condition | None = None,
                    timeout: float = 20.0) -> str:
    """Run `check` in a forked child and say how it went: "passed", "failed" or "hung".

    With `while_held`, another thread of this process holds that lock at the moment of
    the fork, as a background thread may at any time: the child inherits it held.
    """
    held, release = threading.Event(), threading.Event()
    holder = None
    if while_held is not None:
        def hold() -> None:
            with while_held:
                held.set()
                release.wait()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        held.wait()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if check() else 1)
            finally:
                os._exit(2)
    finally:
        release.set()
        if holder is not None:
            holder.join()
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.05)
