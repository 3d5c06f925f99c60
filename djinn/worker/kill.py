"""Killing builds.

A running build is killed over Redis, upstream's wire protocol: PUBLISH
kill-<build id> <build secret>. A queued build has no worker listening yet, so
its kill is settled in the database instead (settle_queued_kill): the claim
never starts a build that is no longer queued.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator

import redis
from sqlalchemy import func, update
from sqlalchemy.orm import Session

from djinn.config import RedisSettings, split_address
from djinn.db.models import Build, BuildJob
from djinn.status import Status

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "kill-"
#: How long a kill for a build this process does not watch (yet) is remembered: it
#: may have been sent between the build's claim and the start of its kill watch.
EARLY_KILL_SECONDS = 60.0
EARLY_KILL_LIMIT = 1000
#: Payloads kept per build, so messages with wrong payloads cannot push out the real one.
EARLY_KILL_PAYLOADS = 8


def kill_channel(build_id: int) -> str:
    return f"{CHANNEL_PREFIX}{build_id}"


def channel_build_id(channel: bytes | str) -> int | None:
    """The build id of a canonical kill channel (`kill-7`), else None (`kill-007`, `kill- 7`, `kill-7x`)."""
    name = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
    digits = name[len(CHANNEL_PREFIX):] if name.startswith(CHANNEL_PREFIX) else ""
    if not digits.isascii() or not digits.isdigit() or (digits != "0" and digits.startswith("0")):
        return None
    return int(digits)


def settle_queued_kill(session: Session, build_id: int) -> bool:
    """End a build that is still queued as `killed`, its jobs with it; False when it is not queued.

    One conditional UPDATE: a worker claiming the build at the same moment either
    claimed it first (then this returns False and the kill goes over Redis) or
    finds it killed and does not start it.
    """
    settled = session.execute(
        update(Build)
        .where(Build.id == build_id, Build.status == Status.QUEUED)
        .values(status=Status.KILLED, finished_at=func.now(), worker=None, heartbeat_at=None)
        .returning(Build.id)
        .execution_options(synchronize_session=False)
    ).first()
    if settled is None:
        return False
    # Jobs that never ran end with the build's status (SPEC section 3); they never started.
    session.execute(
        update(BuildJob)
        .where(BuildJob.build_id == build_id, BuildJob.status.in_([Status.QUEUED, Status.RUNNING]))
        .values(status=Status.KILLED, finished_at=func.now())
        .execution_options(synchronize_session=False)
    )
    return True


def redis_client(settings: RedisSettings, **kwargs: Any) -> redis.Redis:
    host, port = split_address(settings.addr, 6379)
    return redis.Redis(host=host or "localhost", port=port, password=settings.password or None, **kwargs)


def publish_kill(settings: RedisSettings, build_id: int, secret: str) -> int:
    """Ask whichever worker runs the build to kill it; returns how many listeners heard."""
    return redis_client(settings, socket_timeout=5).publish(kill_channel(build_id), secret)


class _Hub:
    """One pattern subscription (kill-*) per process and Redis server, shared by its builds.

    Subscribing per build would cost a connection and a round trip on every build
    start, and a blocking read to stop; with one listener, starting and stopping
    a build's kill watch is a dict update.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.watches: dict[int, tuple[bytes, Callable[[], None]]] = {}
        # Kills heard for builds not watched here (yet): build id -> [(payload, when)].
        self.early: dict[int, list[tuple[bytes, float]]] = {}
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kill-listener", daemon=True)
        self._thread.start()

    def watch(self, build_id: int, secret: bytes, on_kill: Callable[[], None]) -> None:
        with self._lock:
            self.watches[build_id] = (secret, on_kill)
            early = self.early.pop(build_id, [])
        now = time.monotonic()
        if any(now - at < EARLY_KILL_SECONDS and hmac.compare_digest(data, secret) for data, at in early):
            log.info("build %s: kill received before the build's kill watch started", build_id)
            self._fire(build_id, on_kill)

    def unwatch(self, build_id: int) -> None:
        with self._lock:
            self.watches.pop(build_id, None)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        build_id = channel_build_id(channel)
        if build_id is None:
            log.info("kill message on channel %r ignored: not kill-<build id>", channel.decode("utf-8", "replace")[:80])
            return
        with self._lock:
            watch = self.watches.get(build_id)
            if watch is None:
                self._remember_early(build_id, data)
                return
        if hmac.compare_digest(data, watch[0]):
            log.info("build %s: kill received", build_id)
            self._fire(build_id, watch[1])

    def _remember_early(self, build_id: int, data: bytes) -> None:
        """Keep a kill for a build not watched here; called with the lock held."""
        now = time.monotonic()
        if build_id not in self.early and len(self.early) >= EARLY_KILL_LIMIT:
            expired = [b for b, heard in self.early.items() if now - heard[-1][1] >= EARLY_KILL_SECONDS]
            for old in expired or [next(iter(self.early))]:
                del self.early[old]
        heard = self.early.setdefault(build_id, [])
        if len(heard) < EARLY_KILL_PAYLOADS:
            heard.append((data, now))

    @staticmethod
    def _fire(build_id: int, on_kill: Callable[[], None]) -> None:
        threading.Thread(target=on_kill, name=f"kill-{build_id}", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                client = redis_client(self.settings, socket_timeout=None, socket_connect_timeout=2, health_check_interval=10)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe("kill-*")
                self.subscribed.set()
                listen: Callable[[], Iterator[dict[str, Any]]] = pubsub.listen  # redis-py leaves it unannotated
                try:
                    for message in listen():
                        if message.get("type") == "pmessage":
                            self._deliver(message["channel"], message["data"])
                finally:
                    pubsub.close()
                    client.close()
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("kill channel unavailable (%s); retrying", exc)
                time.sleep(1)


_hubs: dict[tuple[int, str], _Hub] = {}
_hubs_lock = threading.Lock()


def _hub(settings: RedisSettings) -> _Hub:
    # Per process: a pool process forked from a parent with a hub needs its own thread.
    key = (os.getpid(), settings.addr)
    with _hubs_lock:
        if key not in _hubs:
            _hubs[key] = _Hub(settings)
        return _hubs[key]


class KillListener:
    """Watches the build's kill channel from start() to stop().

    Only a message equal to the build's secret kills it; anything else is ignored.
    """

    def __init__(self, settings: RedisSettings, build_id: int, secret: str, on_kill: Callable[[], None]) -> None:
        self.build_id = build_id
        self.secret = secret.encode()
        self.on_kill = on_kill
        self.hub = _hub(settings)

    @property
    def subscribed(self) -> threading.Event:
        return self.hub.subscribed

    def start(self) -> "KillListener":
        self.hub.watch(self.build_id, self.secret, self.on_kill)
        # A kill sent before the listener is subscribed would be lost: wait briefly.
        self.hub.subscribed.wait(2)
        return self

    def stop(self) -> None:
        self.hub.unwatch(self.build_id)
