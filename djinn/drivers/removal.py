"""Finished build directories removed behind the build, by one background thread per process.

Removing a directory tree takes milliseconds on a journalling filesystem (more
when it is mounted with `discard`): as long as a short build's job. The build
does not wait for it: its final status is written while the directory goes.
Nothing is left behind: what is still pending is removed when the process exits
(`drain`, also called from the worker's pool-process shutdown), and what a killed
process never got to carries its owner marker, so the next worker's start-up
sweep removes it (djinn.drivers.leftovers).
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from pathlib import Path


class Remover:
    def __init__(self) -> None:
        self._forked()
        # A forked child starts empty: the thread and the pending paths are the parent's, and
        # so may be the lock, held by the parent's thread at the moment of the fork.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[Path] = []
        self._busy = False
        self._thread: threading.Thread | None = None

    def remove(self, path: Path) -> None:
        """Remove `path` (a tree) soon, on the background thread."""
        with self._cond:
            self._pending.append(path)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="build-dir-removal", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every path handed over is gone; whether they are (False after `timeout`)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: bool(self._pending))
                path = self._pending.pop(0)
                self._busy = True
            shutil.rmtree(path, ignore_errors=True)


#: The process's remover.
REMOVER = Remover()
atexit.register(REMOVER.drain, 30)
