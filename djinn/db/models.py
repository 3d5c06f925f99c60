"""The database tables the worker reads and writes (SPEC sections 8 and 11).

The tables are the Djinn server's own (its `revisions/schema`), with the
server's types: the `status`, `driver_type`, `trigger_type` and `visibility`
enums, TIMESTAMP without time zone (UTC wall-clock: djinn.db.engine sets the session
time zone), VARCHAR and BYTEA where the server has them. The worker adds only
nullable or defaulted columns to them (the lease on `builds`) and tables of its
own (`build_job_output`, `build_notifications`), so the Go server keeps working
on a database this worker migrated, and the other way round.

Only the tables the worker touches are mapped here; djinn/migrations creates
all of the server's tables on an empty database.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from djinn.status import Status

# The server's enum types. They exist before the models are used (the migrations
# create them), so SQLAlchemy never creates or drops them itself.
# Mapped to the Status enum: rows read back as Status members (a str subclass, so comparing with text still works).
STATUS = Enum(Status, name="status", values_callable=lambda members: [m.value for m in members], create_type=False)
DRIVER_TYPE = Enum("ssh", "qemu", "docker", "os", name="driver_type", create_type=False)
TRIGGER_TYPE = Enum("manual", "push", "pull", "schedule", name="trigger_type", create_type=False)
VISIBILITY = Enum("private", "internal", "public", name="visibility", create_type=False)

#: Timestamps are TIMESTAMP without time zone, as the server stores them.
TIMESTAMP = DateTime(timezone=False)


def _now() -> Any:
    return func.now()


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "%(table_name)s_%(column_0_name)s_key",
            "fk": "%(table_name)s_%(column_0_name)s_fkey",
            "pk": "%(table_name)s_pkey",
        }
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String, unique=True)
    username: Mapped[str] = mapped_column(String, unique=True)
    # The server's bcrypt hash; b"" (no password can match) for owners `submit` creates.
    password: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # Bytes of artifacts kept per user before the server's curator removes old ones.
    cleanup: Mapped[int] = mapped_column(BigInteger, default=1073741824, server_default="1073741824")
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    updated_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    deleted_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)


class Namespace(Base):
    __tablename__ = "namespaces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    root_id: Mapped[Optional[int]] = mapped_column(Integer)
    parent_id: Mapped[Optional[int]] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String)
    path: Mapped[str] = mapped_column(String)
    description: Mapped[Optional[str]] = mapped_column(String)
    # Depth in the tree: 1 for a root namespace.
    level: Mapped[int] = mapped_column(Integer)
    visibility: Mapped[Optional[str]] = mapped_column(VISIBILITY, default="private", server_default="private")
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


class NamespaceCollaborator(Base):
    __tablename__ = "namespace_collaborators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


class Image(Base):
    """A user's own qemu disk, at `<disks>/<user_id>/qemu/<hash>`."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    namespace_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="SET NULL"))
    driver: Mapped[str] = mapped_column(DRIVER_TYPE)
    hash: Mapped[str] = mapped_column(String, unique=True)
    name: Mapped[str] = mapped_column(String)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


class Object(Base):
    """A file a user uploaded, at `<objects>/<user_id>/<hash>`; a manifest's `objects` name these."""

    __tablename__ = "objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    namespace_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="SET NULL"))
    hash: Mapped[str] = mapped_column(String, unique=True)
    name: Mapped[str] = mapped_column(String)
    type: Mapped[str] = mapped_column(String)
    size: Mapped[int] = mapped_column(BigInteger)
    md5: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    deleted_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)


class Build(Base):
    __tablename__ = "builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    namespace_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="SET NULL"))
    number: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[str] = mapped_column(Text)
    status: Mapped[Status] = mapped_column(STATUS, default=Status.QUEUED, server_default=Status.QUEUED.value)
    output: Mapped[Optional[str]] = mapped_column(Text)
    secret: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)
    pinned: Mapped[Optional[bool]] = mapped_column(Boolean, default=False, server_default="false")
    # The worker's lease (SPEC section 5), added by migration 0002: which worker runs
    # the build, how often it was started, and when that worker last proved it is alive.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[Optional[str]] = mapped_column(String)
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)
    # Why the worker ended the build itself (abandoned after too many attempts, ...).
    error: Mapped[Optional[str]] = mapped_column(Text)

    stages: Mapped[list[BuildStage]] = relationship(back_populates="build", order_by="BuildStage.id")
    jobs: Mapped[list[BuildJob]] = relationship(back_populates="build", order_by="BuildJob.id")
    driver: Mapped[Optional[BuildDriver]] = relationship(back_populates="build", uselist=False)
    variables: Mapped[list[BuildVariable]] = relationship(order_by="BuildVariable.id")
    keys: Mapped[list[BuildKey]] = relationship(order_by="BuildKey.id")
    objects: Mapped[list[BuildObject]] = relationship(order_by="BuildObject.id")
    artifacts: Mapped[list[BuildArtifact]] = relationship(order_by="BuildArtifact.id")
    tags: Mapped[list[BuildTag]] = relationship(order_by="BuildTag.id")
    trigger: Mapped[Optional[BuildTrigger]] = relationship(uselist=False)
    user: Mapped[User] = relationship()

    __table_args__ = (Index("ix_builds_status", "status"),)


class BuildStage(Base):
    """A stage of a build; the server keeps no status or times for stages."""

    __tablename__ = "build_stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String)
    can_fail: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP, server_default=_now())

    build: Mapped[Build] = relationship(back_populates="stages")
    jobs: Mapped[list[BuildJob]] = relationship(back_populates="stage", order_by="BuildJob.id")


class BuildJob(Base):
    __tablename__ = "build_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    stage_id: Mapped[int] = mapped_column(ForeignKey("build_stages.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String)
    commands: Mapped[str] = mapped_column(String)
    output: Mapped[Optional[str]] = mapped_column(Text)
    status: Mapped[Status] = mapped_column(STATUS, default=Status.QUEUED, server_default=Status.QUEUED.value)
    created_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP, server_default=_now())
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)

    build: Mapped[Build] = relationship(back_populates="jobs")
    stage: Mapped[BuildStage] = relationship(back_populates="jobs")
    artifacts: Mapped[list[BuildArtifact]] = relationship(back_populates="job", order_by="BuildArtifact.id")


class BuildJobOutput(Base):
    """Output chunks appended while a job runs, so storing output stays linear (the worker's table).

    Appending to `build_jobs.output` itself would rewrite the whole value on every
    chunk. Chunks are folded into the job and build rows when the build ends.
    """

    __tablename__ = "build_job_output"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    job_id: Mapped[int] = mapped_column(ForeignKey("build_jobs.id", ondelete="CASCADE"))
    data: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_build_job_output_build_id_id", "build_id", "id"),)


class BuildArtifact(Base):
    """A file a job leaves; stored at `<artifacts>/<user_id>/<hash>` (hash: a hashid, djinn.crypto)."""

    __tablename__ = "build_artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    job_id: Mapped[int] = mapped_column(ForeignKey("build_jobs.id"))
    hash: Mapped[str] = mapped_column(String, unique=True)
    # The path in the build environment, and the name it is stored and shown under.
    source: Mapped[str] = mapped_column(String)
    name: Mapped[str] = mapped_column(String)
    size: Mapped[Optional[int]] = mapped_column(BigInteger)
    md5: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    sha256: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())
    deleted_at: Mapped[Optional[dt.datetime]] = mapped_column(TIMESTAMP)

    job: Mapped[BuildJob] = relationship(back_populates="artifacts")


class BuildObject(Base):
    """An object a build needs. As the server writes it: `name` is the object's name and
    `source` the destination path in the build environment."""

    __tablename__ = "build_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    object_id: Mapped[Optional[int]] = mapped_column(ForeignKey("objects.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(String)
    name: Mapped[str] = mapped_column(String)
    placed: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


class BuildVariable(Base):
    __tablename__ = "build_variables"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    variable_id: Mapped[Optional[int]] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String)
    # Standard base64 of the AES-GCM ciphertext (djinn.crypto) when masked.
    value: Mapped[str] = mapped_column(String)
    masked: Mapped[Optional[bool]] = mapped_column(Boolean, default=False, server_default="false")


class BuildKey(Base):
    __tablename__ = "build_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    key_id: Mapped[Optional[int]] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String)
    # The AES-GCM ciphertext of the key material, raw bytes (djinn.crypto).
    key: Mapped[bytes] = mapped_column(LargeBinary)
    config: Mapped[str] = mapped_column(Text, default="")
    location: Mapped[str] = mapped_column(String)


class BuildDriver(Base):
    __tablename__ = "build_drivers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(DRIVER_TYPE)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)

    build: Mapped[Build] = relationship(back_populates="driver")


class BuildTrigger(Base):
    __tablename__ = "build_triggers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    provider_id: Mapped[Optional[int]] = mapped_column(Integer)
    repo_id: Mapped[Optional[int]] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(TRIGGER_TYPE, default="manual")
    comment: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


class BuildTag(Base):
    __tablename__ = "build_tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP, server_default=_now())


# --- telling people about builds ----------------------------------------
#
# Tables for telling people about builds: providers, repositories, namespace webhooks and deliveries.
#
# These are the Djinn server's tables (`providers`, `provider_repos`,
# `namespace_webhooks`, `namespace_webhook_deliveries`), mapped with the server's
# types. `build_notifications` is the worker's own: one row per build and kind of
# notification, the marker that makes the failure mail go out exactly once
# (djinn.notify.mail explains the states).
#
# Secrets (provider tokens, webhook secrets) are AES-GCM ciphertext made with the
# crypto block the server and the worker share (djinn.crypto).


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
