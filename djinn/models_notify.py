"""Tables for telling people about builds: providers, repositories, namespace webhooks and deliveries.

These are the Djinn server's tables (`providers`, `provider_repos`,
`namespace_webhooks`, `namespace_webhook_deliveries`), mapped with the server's
types. `build_notifications` is the worker's own: one row per build and kind of
notification, the marker that makes the failure mail go out exactly once
(djinn.notify.mail explains the states).

Secrets (provider tokens, webhook secrets) are AES-GCM ciphertext made with the
crypto block the server and the worker share (djinn.crypto).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Optional

from sqlalchemy import Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from djinn.models import TIMESTAMP, Base, _now


class Provider(Base):
    """A user's connection to GitHub or GitLab: the token commit statuses are set with."""

    __tablename__ = "providers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    provider_user_id: Mapped[Optional[int]] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String)  # github or gitlab
    # Encrypted (djinn.crypto Cipher.encrypt) OAuth tokens.
    access_token: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    refresh_token: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    connected: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    main_account: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    expires_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)


class ProviderRepo(Base):
    """A repository on a provider; build_triggers.repo_id points here."""

    __tablename__ = "provider_repos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"))
    hook_id: Mapped[Optional[int]] = mapped_column(Integer)
    # The provider's own id of the repository (GitLab's project id).
    repo_id: Mapped[int] = mapped_column(Integer)
    provider_name: Mapped[str] = mapped_column(String)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    # owner/name, as GitHub's API paths want it.
    name: Mapped[Optional[str]] = mapped_column(String)
    href: Mapped[Optional[str]] = mapped_column(String)


class NamespaceWebhook(Base):
    """An HTTP endpoint told about a namespace's events (`events` is upstream's bit mask)."""

    __tablename__ = "namespace_webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    payload_url: Mapped[str] = mapped_column(String)
    # Encrypted HMAC key; None: deliveries are not signed.
    secret: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    # Verify the TLS certificate of an https payload URL.
    ssl: Mapped[bool] = mapped_column(Boolean, default=True)
    events: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


class NamespaceWebhookDelivery(Base):
    """One attempt at delivering an event to a webhook, with what came back.

    Every attempt at delivering one event shares its `event_id` (16 random bytes);
    the primary key is (id, event_id), as the server has it.
    """

    __tablename__ = "namespace_webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("namespace_webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    error: Mapped[Optional[str]] = mapped_column(String)
    event: Mapped[int] = mapped_column(Integer)
    redelivery: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    request_headers: Mapped[Optional[str]] = mapped_column(String)
    request_body: Mapped[Optional[str]] = mapped_column(String)
    response_code: Mapped[Optional[int]] = mapped_column(Integer)
    response_headers: Mapped[Optional[str]] = mapped_column(String)
    response_body: Mapped[Optional[str]] = mapped_column(String)
    duration: Mapped[int] = mapped_column(Integer, default=0)  # milliseconds
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())

    __table_args__ = (Index("ix_namespace_webhook_deliveries_webhook_id_event_id", "webhook_id", "event_id"),)


class BuildNotification(Base):
    """A notification owed for a build, at most one per (build, kind).

    kind `mail`: the failure mail; state pending -> sending -> sent (or skipped,
    failed). kind `status`: the last build status sent to the commit's provider,
    in `state`, so a late duplicate is not sent again.
    """

    __tablename__ = "build_notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    updated_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    sent_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)

    __table_args__ = (
        UniqueConstraint("build_id", "kind"),
        Index("ix_build_notifications_kind_state", "kind", "state"),
    )


class NotificationOutbox(Base):
    """A commit status or webhook delivery owed for a build event, sent from this record (djinn.notify.outbox).

    state pending -> sending -> sent, back to pending (due later) after a failed
    attempt, `failed` when the attempts are used up. `body` and `event_id` are
    the webhook payload fixed when the event happened, so every attempt sends
    the same bytes.
    """

    __tablename__ = "notification_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # status or webhook
    event: Mapped[str] = mapped_column(String(32))  # build.started or build.finished
    webhook_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespace_webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[Optional[uuid.UUID]] = mapped_column(Uuid)
    body: Mapped[Optional[str]] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[Optional[str]] = mapped_column(Text)
    due_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    updated_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    sent_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)

    __table_args__ = (Index("ix_notification_outbox_state_due_at", "state", "due_at"),)
