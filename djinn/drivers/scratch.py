"""Build directories made ahead of the build and recycled or removed behind it, by one background thread per process.

Making a directory and removing a tree each take from a tenth of a millisecond to
a few on a journalling filesystem, and on ext4 making one searches for a free inode
past every one freed in the last seconds: under a stream of short builds that
search was a third of a build's CPU. A build waits for none of it. Its directory
is a spare, renamed to name its build (a rename is quick). Behind the build its
directory is emptied and becomes a spare again (no inode is freed or allocated),
or, when it cannot be plainly emptied, removed. A spare is made new only when
none is left.

Nothing is left behind: `drain` (at process exit, and from the worker's pool-process
shutdown) waits for what is pending and removes the spares nobody took; what a
killed process never got to names its owner, so the next worker's start-up sweep
removes it (djinn.drivers.leftovers).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Hashable

log = logging.getLogger(__name__)

#: Spares kept per key: one for the next build, one more that a finished build left.
MAX_SPARES = 2


class Scratch:
    def __init__(self) -> None:
        self._forked()
        # A forked child starts empty: the thread, the work and the spares are the parent's,
        # and so may be the lock, held by the parent's thread at the moment of the fork.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._cond = threading.Condition()
        self._work: list[Callable[[], None]] = []
        self._busy = False
        self._thread: threading.Thread | None = None
        self._spares: dict[Hashable, list[Path]] = {}
        self._making: set[Hashable] = set()

    def take(self, key: Hashable, make: Callable[[], Path]) -> Path | None:
        """A spare for `key` if one is ready (None if not); when none is left, `make` makes the next in the background.

        `make` runs on the background thread; a spare is this process's alone.
        """
        with self._cond:
            ready = self._spares.get(key)
            spare = ready.pop() if ready else None
            if ready or key in self._making:
                return spare
            self._making.add(key)
        self._submit(lambda: self._make_spare(key, make))
        return spare

    def recycle(self, key: Hashable, path: Path, clean: Callable[[Path], Path | None]) -> None:
        """Make `path` a spare for `key` again, soon: `clean` empties it and names it a spare (None when it cannot).

        What `clean` does not hand back, and a spare beyond MAX_SPARES, is removed.
        """
        self._submit(lambda: self._recycle(key, path, clean))

    def spares(self, key: Hashable) -> int:
        """How many spares for `key` are ready to be taken."""
        with self._cond:
            return len(self._spares.get(key, ()))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every path handed over is gone, and remove the spares; whether all are gone (False after `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._work and not self._busy and not self._making, timeout):
                return False
            spares = [spare for ready in self._spares.values() for spare in ready]
            self._spares = {}
        for spare in spares:
            shutil.rmtree(spare, ignore_errors=True)
        return True

    def _make_spare(self, key: Hashable, make: Callable[[], Path]) -> None:
        try:
            spare: Path | None = make()
        except Exception as exc:  # the build that wants one then makes its own, and says why
            log.warning("could not make a build directory ahead: %s", exc)
            spare = None
        with self._cond:
            self._making.discard(key)
            if spare is not None:
                self._spares.setdefault(key, []).append(spare)

    def _recycle(self, key: Hashable, path: Path, clean: Callable[[Path], Path | None]) -> None:
        with self._cond:
            wanted = len(self._spares.get(key, ())) < MAX_SPARES
        spare = None
        if wanted:
            try:
                spare = clean(path)
            except Exception as exc:  # removed instead, as it would have been
                log.warning("could not empty build directory %s for the next build: %s", path, exc)
        if spare is None:
            shutil.rmtree(path, ignore_errors=True)
            return
        with self._cond:
            ready = self._spares.setdefault(key, [])
            if len(ready) < MAX_SPARES:
                ready.append(spare)
                return
        shutil.rmtree(spare, ignore_errors=True)

    def _submit(self, work: Callable[[], None]) -> None:
        with self._cond:
            self._work.append(work)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="build-dirs", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: bool(self._work))
                work = self._work.pop(0)
                self._busy = True
            work()


#: The process's scratch directories.
SCRATCH = Scratch()
atexit.register(SCRATCH.drain, 30)
