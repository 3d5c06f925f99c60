"""What a worker process needs to run builds, made once per process from the config files."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from djinn.config import DriverConfig, WorkerConfig, load_driver_config, load_worker_config
from djinn.crypto import Cipher
from djinn.db.engine import make_engine, sessions
from djinn.runner.store import FileStore

if TYPE_CHECKING:
    from celery import Celery

# Celery is imported where it is used: the operator commands (status, logs, kill)
# need a context but no Celery app, and importing it cost them a seventh of their time.


@dataclass
class WorkerContext:
    config: WorkerConfig
    drivers: DriverConfig
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def from_files(cls, config_path: str, driver_path: str) -> "WorkerContext":
        return cls(load_worker_config(config_path), load_driver_config(driver_path))

    @property
    def stale_after(self) -> dt.timedelta:
        """A heartbeat older than this means the worker died: three beats were missed."""
        return self.config.orphan_timeout * 3 / 4

    @property
    def fence_after(self) -> float:
        """Seconds without a heartbeat that landed after which a run stops itself (djinn.db.lease).

        1/8 of orphan_timeout before anyone may call the lease stale, so the old run
        is gone before another worker can start the build again.
        """
        return self.config.orphan_timeout.total_seconds() * 5 / 8

    @property
    def heartbeat_interval(self) -> float:
        # Four beats fit in the fence window: a database away for half of orphan_timeout stops nothing.
        return self.config.orphan_timeout.total_seconds() / 8

    @property
    def reaper_interval(self) -> float:
        # Stale after 3/4 of orphan_timeout, seen within 1/8 more: noticed within orphan_timeout.
        return self.config.orphan_timeout.total_seconds() / 8

    @cached_property
    def engine(self) -> Engine:
        # A transaction left open by a frozen worker ends before its lease could be taken over.
        return make_engine(self.config.database, idle_transaction_timeout=self.stale_after.total_seconds())

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return sessions(self.engine)

    @cached_property
    def cipher(self) -> Cipher | None:
        return Cipher(self.config.crypto) if self.config.crypto else None

    @cached_property
    def artifacts(self) -> FileStore:
        return FileStore(self.config.artifacts.path, int(self.config.artifacts.limit))

    @cached_property
    def objects(self) -> FileStore:
        return FileStore(self.config.objects.path)

    @cached_property
    def app(self) -> Celery:
        from djinn.worker.queue import make_app  # Celery: only where an app is wanted (see above)

        return make_app(self.config)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()


_lock = threading.Lock()
_current: tuple[int, WorkerContext] | None = None


def current() -> WorkerContext:
    """This process's context, from DJINN_WORKER_CONFIG / DJINN_DRIVER_CONFIG.

    Made anew after a fork: a pool process must not share database connections
    with its parent.
    """
    global _current
    with _lock:
        if _current is None or _current[0] != os.getpid():
            from djinn.worker.queue import config_paths  # with Celery: a worker process has it loaded already

            _current = (os.getpid(), WorkerContext.from_files(*config_paths()))
        return _current[1]
