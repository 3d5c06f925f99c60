"""What the notifiers share: task names, the host links point at, sending a task to the worker's queue."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from djinn.config import WorkerConfig
from djinn.crypto import Cipher

log = logging.getLogger("djinn.notify")


class NotifyContext(Protocol):
    """What the notifiers use of a worker (djinn.worker.context.WorkerContext is one)."""

    config: WorkerConfig
    name: str

    @property
    def sessions(self) -> sessionmaker[Session]: ...

    @property
    def cipher(self) -> Cipher | None: ...

    @property
    def app(self) -> Any: ...  # the Celery app: tasks are sent through it


SEND_FAILURE_MAIL = "djinn.send_failure_mail"
SEND_ADMIN_MAIL = "djinn.send_admin_mail"
SET_COMMIT_STATUS = "djinn.set_commit_status"
DELIVER_WEBHOOK = "djinn.deliver_webhook"

# Where the Djinn server that shows builds lives, when the worker config does not
# say (see `host`): upstream's public instance.
DEFAULT_HOST = "https://djinn-ci.com"


def host(config: Any) -> str:
    """The base URL of build links: the worker config's top-level `host`, else DEFAULT_HOST."""
    return (config.host or DEFAULT_HOST).rstrip("/")


def build_url(base: str, username: str, number: int) -> str:
    """Where a build is shown: <host>/b/<user>/<number>, as upstream's Build.Endpoint()."""
    return f"{base}/b/{username}/{number}"


def send_task(ctx: NotifyContext, name: str, *args: Any, countdown: float | None = None) -> None:
    """Queue notification task `name` on this worker's own queue (it serves no other)."""
    options: dict[str, Any] = {"queue": ctx.config.queue}
    if countdown:
        options["countdown"] = countdown
    ctx.app.send_task(name, args=list(args), **options)
