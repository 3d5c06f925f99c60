"""Kill over Redis, upstream's wire protocol: PUBLISH kill-<build id> <build secret>."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import redis

from djinn.config import RedisSettings

log = logging.getLogger(__name__)


def kill_channel(build_id: int) -> str:
    return f"kill-{build_id}"


def redis_client(settings: RedisSettings, **kwargs) -> redis.Redis:
    host, _, port = settings.addr.rpartition(":")
    return redis.Redis(host=host or "localhost", port=int(port or 6379), password=settings.password or None, **kwargs)


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
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kill-listener", daemon=True)
        self._thread.start()

    def watch(self, build_id: int, secret: bytes, on_kill: Callable[[], None]) -> None:
        with self._lock:
            self.watches[build_id] = (secret, on_kill)

    def unwatch(self, build_id: int) -> None:
        with self._lock:
            self.watches.pop(build_id, None)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        try:
            build_id = int(channel.decode().removeprefix("kill-"))
        except ValueError:
            return
        with self._lock:
            watch = self.watches.get(build_id)
        if watch is not None and data == watch[0]:
            log.info("build %s: kill received", build_id)
            threading.Thread(target=watch[1], name=f"kill-{build_id}", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                client = redis_client(self.settings, socket_timeout=None, socket_connect_timeout=2, health_check_interval=10)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe("kill-*")
                self.subscribed.set()
                try:
                    for message in pubsub.listen():
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
