"""A background thread that calls a function every so often until stopped."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `action` every `interval` seconds; an exception is logged and the next pass tries again.

    `action` returning False ends the thread (a heartbeat that lost its lease).
    """

    def __init__(self, name: str, interval: float, action: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Periodic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.action() is False:
                    return
            except Exception as exc:  # broker or database away: the next pass tries again
                log.warning("%s: %s", self.name, exc)
                from djinn import metrics

                metrics.error(exc)
