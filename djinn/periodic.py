"""A background thread that calls a function every so often until stopped."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `action` every `interval` seconds; an exception is logged and the next pass tries again.

    `action` returning False ends the thread (a heartbeat that lost its lease);
    `on_error` hears of each failed pass (the worker counts them in its metrics).
    """

    def __init__(
        self,
        name: str,
        interval: float,
        action: Callable[[], object],
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.name = name
        self.interval = interval
        self.action = action
        self.on_error = on_error
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
                if self.on_error is not None:
                    self.on_error(exc)
