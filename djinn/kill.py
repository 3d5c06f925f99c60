"""Kill over Redis, upstream's wire protocol: PUBLISH kill-<build id> <build secret>."""

from __future__ import annotations

import logging
import threading
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


class KillListener:
    """Listens on the build's kill channel until stopped, surviving Redis restarts.

    Only a message equal to the build's secret kills it; anything else is ignored.
    """

    def __init__(self, settings: RedisSettings, build_id: int, secret: str, on_kill: Callable[[], None]) -> None:
        self.settings = settings
        self.build_id = build_id
        self.secret = secret.encode()
        self.on_kill = on_kill
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kill-{build_id}", daemon=True)

    def start(self) -> "KillListener":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client = redis_client(self.settings, socket_timeout=5, socket_connect_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(kill_channel(self.build_id))
                self.subscribed.set()
                try:
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message and message.get("type") == "message" and message.get("data") == self.secret:
                            log.info("build %s: kill received", self.build_id)
                            self.on_kill()
                            return
                finally:
                    pubsub.close()
                    client.close()
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("build %s: kill channel unavailable (%s); retrying", self.build_id, exc)
                self._stop.wait(1)
