"""Namespace webhooks `build.started` and `build.finished` (SPEC section 7).

The payload is the build as JSON (upstream's shape), taken when the event
happens, so a delivery that is retried later sends the same bytes with the same
signature. Every attempt is recorded in namespace_webhook_deliveries with what
came back; attempts after the first are marked `redelivery`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from djinn.db.engine import transaction
from djinn.db.models import Build, Namespace, NamespaceWebhook, NamespaceWebhookDelivery, User
from djinn.notify import http
from djinn.notify.common import NotifyContext, build_url, host, log

# Upstream's event bit mask (djinn-ci.com/event): namespace_webhooks.events holds these.
EVENTS = {
    "build.submitted": 1 << 0,
    "build.started": 1 << 1,
    "build.finished": 1 << 2,
    "build.tagged": 1 << 3,
}
BUILD_STARTED = "build.started"
BUILD_FINISHED = "build.finished"
# A finished build's output goes into the payload up to this size (null beyond).
OUTPUT_LIMIT = 1 << 20


class DeliveryFailed(Exception):
    """The receiver did not take the event (no answer or not 2xx): deliver again later."""


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # the server's TIMESTAMP columns hold UTC wall-clock time
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _user(user: User | None) -> dict[str, Any] | None:
    if user is None:
        return None
    return {"id": user.id, "email": user.email, "username": user.username, "created_at": _time(user.created_at)}


def build_json(session: Session, build: Build, base: str) -> dict[str, Any]:
    """The build the way upstream's webhooks and API show it."""
    username = build.user.username if build.user is not None else str(build.user_id)
    url = build_url(base, username, build.number)
    output = build.output if build.output is not None and len(build.output) <= OUTPUT_LIMIT else None
    data: dict[str, Any] = {
        "id": build.id,
        "user_id": build.user_id,
        "namespace_id": build.namespace_id,
        "number": build.number,
        "manifest": build.manifest,
        "status": build.status,
        "output": output,
        "tags": [tag.name for tag in build.tags],
        "pinned": bool(build.pinned),
        "created_at": _time(build.created_at),
        "started_at": _time(build.started_at),
        "finished_at": _time(build.finished_at),
        "url": url,
        "objects_url": f"{url}/objects",
        "variables_url": f"{url}/variables",
        "jobs_url": f"{url}/jobs",
        "artifacts_url": f"{url}/artifacts",
        "tags_url": f"{url}/tags",
        "user": _user(build.user),
    }
    if build.namespace_id is not None:
        namespace = session.get(Namespace, build.namespace_id)
        if namespace is not None:
            owner = session.get(User, namespace.user_id)
            ns_url = f"{base}/n/{owner.username if owner else namespace.user_id}/{namespace.path}"
            data["namespace"] = {
                "id": namespace.id,
                "user_id": namespace.user_id,
                "root_id": namespace.root_id,
                "parent_id": namespace.parent_id,
                "name": namespace.name,
                "path": namespace.path,
                "description": namespace.description,
                "visibility": namespace.visibility,
                "created_at": _time(namespace.created_at),
                "url": ns_url,
                "builds_url": f"{ns_url}/-/builds",
                "user": _user(owner),
            }
    if build.trigger is not None:
        data["trigger"] = {"type": build.trigger.type, "comment": build.trigger.comment, "data": build.trigger.data or {}}
    return data


def hooks_for(session: Session, namespace_id: int | None, event: str) -> list[int]:
    """The active webhooks of the namespace that asked for `event`."""
    if namespace_id is None:
        return []
    bit = EVENTS[event]
    return list(
        session.scalars(
            select(NamespaceWebhook.id)
            .where(
                NamespaceWebhook.namespace_id == namespace_id,
                NamespaceWebhook.active,
                NamespaceWebhook.events.op("&")(bit) != 0,
            )
            .order_by(NamespaceWebhook.id)
        )
    )


def event_payloads(ctx: NotifyContext, session: Session, build_id: int, event: str) -> list[tuple[int, str, str, str]]:
    """(webhook id, event, event id, body) for every webhook that wants this build's `event`."""
    build = session.get(Build, build_id)
    if build is None:
        return []
    hooks = hooks_for(session, build.namespace_id, event)
    if not hooks:
        return []
    body = json.dumps(build_json(session, build, host(ctx.config)))
    event_id = str(uuid.uuid4())
    return [(hook_id, event, event_id, body) for hook_id in hooks]


def signature(secret: bytes, body: bytes) -> str:
    """X-Djinn-CI-Signature: sha256=<hex HMAC-SHA256 of the body with the hook's secret>."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def deliver(ctx: NotifyContext, webhook_id: int, event: str, event_id: str, body: str, *, redelivery: bool = False) -> str:
    """POST one event to one webhook and record the attempt; raises DeliveryFailed unless 2xx."""
    with ctx.sessions() as session:
        hook = session.get(NamespaceWebhook, webhook_id)
        if hook is None or not hook.active:
            return "nothing to do: the webhook is gone or inactive"
        payload_url, secret, verify = hook.payload_url, hook.secret, hook.ssl
    data = body.encode()
    headers = {
        "Accept": "*/*",
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Djinn-CI-Hook",
        "X-Djinn-CI-Event": event,
        "X-Djinn-CI-Hook-ID": str(webhook_id),
    }
    if secret:
        if ctx.cipher is None:
            error = "the webhook has a secret but the worker config has no crypto block to decrypt it"
            _record(ctx, webhook_id, event, event_id, headers, body, http.Response(None, error=error), redelivery)
            log.error("webhook %s: %s", webhook_id, error)
            return f"failed: {error}"
        headers["X-Djinn-CI-Signature"] = signature(ctx.cipher.decrypt(secret), data)
    response = http.post(payload_url, data, headers, verify=verify)
    _record(ctx, webhook_id, event, event_id, headers, body, response, redelivery)
    if not response.ok:
        raise DeliveryFailed(f"webhook {webhook_id} {event}: {response.describe()}")
    return f"delivered: HTTP {response.code}"


def _record(
    ctx: NotifyContext, webhook_id: int, event: str, event_id: str, headers: dict[str, str], body: str, response: http.Response, redelivery: bool
) -> None:
    with transaction(ctx.sessions) as session:
        session.add(
            NamespaceWebhookDelivery(
                webhook_id=webhook_id,
                event_id=uuid.UUID(event_id).bytes,  # the server's BYTEA event id
                event=EVENTS[event],
                error=response.error,
                redelivery=redelivery,
                request_headers=http.encode_headers(headers),
                request_body=body,
                response_code=response.code,
                response_headers=http.encode_headers(response.headers) if response.code is not None else None,
                response_body=response.body.decode("utf-8", "replace") if response.code is not None else None,
                duration=response.duration_ms,
            )
        )
