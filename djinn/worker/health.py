"""Is this worker able to work? Its broker (Redis) and its database (PostgreSQL) must answer.

Used by the `/healthz` endpoint of the metrics listener: 200 when both answer,
503 otherwise, with what failed. Each check is bounded by a short timeout so a
hung server makes the probe fail rather than hang.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from djinn.config import WorkerConfig
from djinn.db.engine import database_url
from djinn.worker.kill import redis_client

TIMEOUT = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "seconds": round(self.seconds, 3)}


def _timed(name: str, probe: Callable[[], str]) -> Check:
    start = time.monotonic()
    try:
        detail = probe()
        return Check(name, True, detail, time.monotonic() - start)
    except Exception as exc:  # any failure to answer is unhealthy; say what it was
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return Check(name, False, f"{type(exc).__name__}: {reason[0] if reason else ''}", time.monotonic() - start)


class HealthChecker:
    """Checks broker and database with connections of its own (never the builds')."""

    def __init__(self, config: WorkerConfig, timeout: float = TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="health")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            ms = int(self.timeout * 1000)
            self._engine = create_engine(
                database_url(self.config.database),
                poolclass=NullPool,
                connect_args={"connect_timeout": max(1, int(self.timeout)), "options": f"-c statement_timeout={ms}"},
            )
        return self._engine

    def broker(self) -> Check:
        def probe() -> str:
            client = redis_client(self.config.redis, socket_connect_timeout=self.timeout, socket_timeout=self.timeout)
            try:
                client.ping()
            finally:
                client.close()
            return f"redis {self.config.redis.addr} answered"

        return _timed("broker", probe)

    def database(self) -> Check:
        def probe() -> str:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return f"postgresql {self.config.database.addr} answered"

        return _timed("database", probe)

    def check(self) -> tuple[bool, list[Check]]:
        """Both checks at once; healthy when both answered."""
        with self._lock:  # a flood of probes makes one set of connections at a time
            broker = self._pool.submit(self.broker)
            database = self._pool.submit(self.database)
            checks = [broker.result(), database.result()]
        return all(c.ok for c in checks), checks
