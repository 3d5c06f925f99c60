"""The database tables the worker reads and writes (SPEC section 8).

Table and column names follow upstream djinn so operators and tools recognise
them; the worker adds the lease columns on `builds` and the `build_job_output`
table that holds output while a job runs.
"""

from __future__ import annotations

import datetime as dt
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
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from djinn.status import Status

STATUS = Enum(
    *[s.value for s in Status],
    name="build_status",
)
DRIVER_TYPE = Enum("docker", "qemu", "ssh", "os", name="driver_type")
TRIGGER_TYPE = Enum("manual", "push", "pull", "schedule", name="trigger_type")


def _now() -> Any:
    return func.now()


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[Optional[str]] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Namespace(Base):
    __tablename__ = "namespaces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    root_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    description: Mapped[Optional[str]] = mapped_column(Text)
    visibility: Mapped[str] = mapped_column(String(16), default="private")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (UniqueConstraint("user_id", "path"),)


class NamespaceCollaborator(Base):
    __tablename__ = "namespace_collaborators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Object(Base):
    """A file a user uploaded; a manifest's `objects` name these."""

    __tablename__ = "objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    namespace_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="SET NULL"))
    hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(128), default="application/octet-stream")
    size: Mapped[int] = mapped_column(BigInteger)
    md5: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    sha256: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    deleted_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("user_id", "name"),)


class Build(Base):
    __tablename__ = "builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    namespace_id: Mapped[Optional[int]] = mapped_column(ForeignKey("namespaces.id", ondelete="SET NULL"))
    number: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(STATUS, default=Status.QUEUED.value, server_default=Status.QUEUED.value)
    output: Mapped[Optional[str]] = mapped_column(Text)
    secret: Mapped[Optional[str]] = mapped_column(String(64))
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
    # The lease (SPEC section 5): which worker runs the build, how often it was
    # started, and when that worker last proved it is alive.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[Optional[str]] = mapped_column(String(255))
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
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

    __table_args__ = (UniqueConstraint("user_id", "number"), Index("ix_builds_status", "status"))


class BuildStage(Base):
    __tablename__ = "build_stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)
    can_fail: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    build: Mapped[Build] = relationship(back_populates="stages")
    jobs: Mapped[list[BuildJob]] = relationship(back_populates="stage", order_by="BuildJob.id")


class BuildJob(Base):
    __tablename__ = "build_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("build_stages.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    commands: Mapped[str] = mapped_column(Text)
    output: Mapped[Optional[str]] = mapped_column(Text)
    status: Mapped[str] = mapped_column(STATUS, default=Status.QUEUED.value, server_default=Status.QUEUED.value)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))

    build: Mapped[Build] = relationship(back_populates="jobs")
    stage: Mapped[BuildStage] = relationship(back_populates="jobs")
    artifacts: Mapped[list[BuildArtifact]] = relationship(back_populates="job", order_by="BuildArtifact.id")


class BuildJobOutput(Base):
    """Output chunks appended while a job runs, so storing output stays linear.

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
    __tablename__ = "build_artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("build_jobs.id", ondelete="CASCADE"))
    hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    size: Mapped[Optional[int]] = mapped_column(BigInteger)
    md5: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    sha256: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    deleted_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))

    job: Mapped[BuildJob] = relationship(back_populates="artifacts")


class BuildObject(Base):
    __tablename__ = "build_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    object_id: Mapped[Optional[int]] = mapped_column(ForeignKey("objects.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    placed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class BuildVariable(Base):
    __tablename__ = "build_variables"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    variable_id: Mapped[Optional[int]] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(Text)
    # Encrypted (base64 AES-GCM, see djinn.crypto) when masked.
    value: Mapped[str] = mapped_column(Text)
    masked: Mapped[bool] = mapped_column(Boolean, default=False)


class BuildKey(Base):
    __tablename__ = "build_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[Optional[int]] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    # Encrypted key material (AES-GCM, see djinn.crypto).
    key: Mapped[bytes] = mapped_column(LargeBinary)
    config: Mapped[str] = mapped_column(Text, default="")
    location: Mapped[str] = mapped_column(Text)


class BuildDriver(Base):
    __tablename__ = "build_drivers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), unique=True)
    type: Mapped[str] = mapped_column(DRIVER_TYPE)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)

    build: Mapped[Build] = relationship(back_populates="driver")


class BuildTrigger(Base):
    __tablename__ = "build_triggers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), unique=True)
    provider_id: Mapped[Optional[int]] = mapped_column(Integer)
    repo_id: Mapped[Optional[int]] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(TRIGGER_TYPE, default="manual")
    comment: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class BuildTag(Base):
    __tablename__ = "build_tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


# The notification tables live in their own module; imported here so they share the metadata.
from djinn import models_notify  # noqa: E402,F401
