"""The Djinn server's schema: every table its revisions/schema create, with its types

Revision ID: 0001
Revises:
Create Date: 2026-12-01 23:40:00

On a database the server already made, this creates nothing: each enum type and
table is made only when missing. On an empty database it lays out the tables as
the server's revisions leave them (after all of them: build_stages without status
or times, BIGINT sizes and cleanup, the `masked` and `pinned` columns), so the
server can run on it later. Constraint names are left to PostgreSQL, as the
server leaves them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ENUMS = {
    "visibility": ("private", "internal", "public"),
    "status": ("queued", "running", "passed", "passed_with_failures", "failed", "killed", "timed_out"),
    "driver_type": ("ssh", "qemu", "docker"),
    "trigger_type": ("manual", "push", "pull", "schedule"),
    "schedule": ("daily", "weekly", "monthly"),
}

NOW = sa.text("now()")


def _enum(name: str) -> postgresql.ENUM:
    return postgresql.ENUM(*ENUMS[name], name=name, create_type=False)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _ref(name: str, target: str, nullable: bool = False, ondelete: str | None = None) -> sa.Column:
    return sa.Column(name, sa.Integer(), sa.ForeignKey(target, ondelete=ondelete), nullable=nullable)


def _varchar(name: str, nullable: bool = False, unique: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(), nullable=nullable, unique=unique)


def _flag(name: str, default: bool | None, nullable: bool = False) -> sa.Column:
    server_default = None if default is None else (sa.true() if default else sa.false())
    return sa.Column(name, sa.Boolean(), nullable=nullable, server_default=server_default)


def _bytes(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.LargeBinary(), nullable=nullable)


def _stamp(name: str, nullable: bool = False, default: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=False), nullable=nullable, server_default=NOW if default else None)


def _created(nullable: bool = False) -> sa.Column:
    return _stamp("created_at", nullable=nullable, default=True)


def _tables() -> list[tuple[str, list[sa.Column]]]:
    """Each table with its columns as the server's revisions leave them, referenced tables first."""
    return [
        ("users", [
            _id(),
            _varchar("email", unique=True),
            _varchar("username", unique=True),
            _bytes("password"),
            _flag("verified", False),
            sa.Column("cleanup", sa.BigInteger(), nullable=False, server_default=sa.text("1073741824")),
            _created(),
            _stamp("updated_at", default=True),
            _stamp("deleted_at", nullable=True),
        ]),
        ("account_tokens", [
            _id(),
            _ref("user_id", "users.id"),
            _varchar("token", unique=True),
            _varchar("purpose"),
            _created(),
            _stamp("expires_at"),
        ]),
        ("providers", [
            _id(),
            _ref("user_id", "users.id"),
            sa.Column("provider_user_id", sa.Integer(), nullable=True),
            _varchar("name"),
            _bytes("access_token", nullable=True),
            _bytes("refresh_token", nullable=True),
            _flag("connected", False),
            _flag("main_account", False),
            _stamp("expires_at", nullable=True),
        ]),
        ("namespaces", [
            _id(),
            _ref("user_id", "users.id"),
            sa.Column("root_id", sa.Integer(), nullable=True),
            sa.Column("parent_id", sa.Integer(), nullable=True),
            _varchar("name"),
            _varchar("path"),
            _varchar("description", nullable=True),
            sa.Column("level", sa.Integer(), nullable=False),
            sa.Column("visibility", _enum("visibility"), nullable=True, server_default="private"),
            _created(),
        ]),
        ("namespace_invites", [
            _id(),
            _ref("namespace_id", "namespaces.id", ondelete="CASCADE"),
            _ref("invitee_id", "users.id", ondelete="CASCADE"),
            _ref("inviter_id", "users.id", ondelete="CASCADE"),
            _created(),
        ]),
        ("namespace_collaborators", [
            _id(),
            _ref("namespace_id", "namespaces.id", ondelete="CASCADE"),
            _ref("user_id", "users.id", ondelete="CASCADE"),
            _created(),
        ]),
        ("provider_repos", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("provider_id", "providers.id"),
            sa.Column("hook_id", sa.Integer(), nullable=True),
            sa.Column("repo_id", sa.Integer(), nullable=False),
            _varchar("provider_name"),
            _flag("enabled", True),
            _varchar("name", nullable=True),
            _varchar("href", nullable=True),
        ]),
        ("images", [
            _id(),
            _ref("user_id", "users.id", ondelete="CASCADE"),
            _ref("author_id", "users.id"),
            _ref("namespace_id", "namespaces.id", nullable=True, ondelete="SET NULL"),
            sa.Column("driver", _enum("driver_type"), nullable=False),
            _varchar("hash", unique=True),
            _varchar("name"),
            _created(),
        ]),
        ("objects", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("author_id", "users.id"),
            _ref("namespace_id", "namespaces.id", nullable=True, ondelete="SET NULL"),
            _varchar("hash", unique=True),
            _varchar("name"),
            _varchar("type"),
            sa.Column("size", sa.BigInteger(), nullable=False),
            _bytes("md5"),
            _bytes("sha256"),
            _created(),
            _stamp("deleted_at", nullable=True),
        ]),
        ("variables", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("author_id", "users.id"),
            _ref("namespace_id", "namespaces.id", nullable=True, ondelete="SET NULL"),
            _varchar("key"),
            _varchar("value"),
            _created(),
            _flag("masked", False, nullable=True),
        ]),
        ("keys", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("author_id", "users.id"),
            _ref("namespace_id", "namespaces.id", nullable=True, ondelete="SET NULL"),
            _varchar("name"),
            _bytes("key"),
            sa.Column("config", sa.Text(), nullable=False),
            _created(),
            _stamp("updated_at", default=True),
        ]),
        ("builds", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("namespace_id", "namespaces.id", nullable=True, ondelete="SET NULL"),
            sa.Column("number", sa.Integer(), nullable=False),
            sa.Column("manifest", sa.Text(), nullable=False),
            sa.Column("status", _enum("status"), nullable=True, server_default="queued"),
            sa.Column("output", sa.Text(), nullable=True),
            sa.Column("secret", sa.Text(), nullable=True),
            _created(),
            _stamp("started_at", nullable=True),
            _stamp("finished_at", nullable=True),
            _flag("pinned", False, nullable=True),
        ]),
        ("build_tags", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _varchar("name"),
            _created(),
        ]),
        ("build_stages", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _varchar("name"),
            _flag("can_fail", None),
            _created(nullable=True),
        ]),
        ("build_jobs", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _ref("stage_id", "build_stages.id", ondelete="CASCADE"),
            _varchar("name"),
            _varchar("commands"),
            sa.Column("output", sa.Text(), nullable=True),
            sa.Column("status", _enum("status"), nullable=True, server_default="queued"),
            _created(nullable=True),
            _stamp("started_at", nullable=True),
            _stamp("finished_at", nullable=True),
        ]),
        ("build_objects", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _ref("object_id", "objects.id", nullable=True, ondelete="SET NULL"),
            _varchar("source"),
            _varchar("name"),
            _flag("placed", False),
            _created(),
        ]),
        ("build_artifacts", [
            _id(),
            _ref("user_id", "users.id", ondelete="CASCADE"),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _ref("job_id", "build_jobs.id"),
            _varchar("hash", unique=True),
            _varchar("source"),
            _varchar("name"),
            sa.Column("size", sa.BigInteger(), nullable=True),
            _bytes("md5", nullable=True),
            _bytes("sha256", nullable=True),
            _created(),
            sa.Column("deleted_at", sa.DateTime(timezone=False), nullable=True, server_default=sa.text("NULL")),
        ]),
        ("build_variables", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _ref("variable_id", "variables.id", nullable=True, ondelete="SET NULL"),
            _varchar("key"),
            _varchar("value"),
            _flag("masked", False, nullable=True),
        ]),
        ("build_drivers", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            sa.Column("type", _enum("driver_type"), nullable=False),
            sa.Column("config", sa.JSON(), nullable=False),
        ]),
        ("build_triggers", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _ref("provider_id", "providers.id", nullable=True, ondelete="SET NULL"),
            _ref("repo_id", "provider_repos.id", nullable=True, ondelete="SET NULL"),
            sa.Column("type", _enum("trigger_type"), nullable=False),
            sa.Column("comment", sa.Text(), nullable=False),
            sa.Column("data", sa.JSON(), nullable=False),
            _created(),
        ]),
        ("build_keys", [
            _id(),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _ref("key_id", "keys.id", nullable=True, ondelete="SET NULL"),
            _varchar("name"),
            _bytes("key"),
            sa.Column("config", sa.Text(), nullable=False),
            _varchar("location"),
        ]),
        ("cron", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("author_id", "users.id"),
            _ref("namespace_id", "namespaces.id", nullable=True),
            _varchar("name"),
            sa.Column("schedule", _enum("schedule"), nullable=False),
            sa.Column("manifest", sa.Text(), nullable=False),
            _stamp("prev_run", nullable=True),
            _stamp("next_run"),
            _created(),
        ]),
        ("cron_builds", [
            _id(),
            _ref("cron_id", "cron.id", ondelete="CASCADE"),
            _ref("build_id", "builds.id", ondelete="CASCADE"),
            _created(),
        ]),
        ("oauth_apps", [
            _id(),
            _ref("user_id", "users.id"),
            _varchar("client_id", unique=True),
            _bytes("client_secret"),
            _varchar("name"),
            _varchar("description", nullable=True),
            _varchar("home_uri"),
            _varchar("redirect_uri"),
            _created(),
        ]),
        ("oauth_codes", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("app_id", "oauth_apps.id"),
            _varchar("code", unique=True),
            _bytes("scope"),
            _stamp("expires_at"),
        ]),
        ("oauth_tokens", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("app_id", "oauth_apps.id", nullable=True, ondelete="CASCADE"),
            _varchar("name", nullable=True),
            _varchar("token", unique=True),
            _bytes("scope"),
            _created(),
            _stamp("updated_at", default=True),
        ]),
        ("namespace_webhooks", [
            _id(),
            _ref("user_id", "users.id"),
            _ref("author_id", "users.id"),
            _ref("namespace_id", "namespaces.id"),
            _varchar("payload_url"),
            _bytes("secret", nullable=True),
            _flag("ssl", None),
            sa.Column("events", sa.Integer(), nullable=False),
            _flag("active", True),
            _created(),
        ]),
        ("namespace_webhook_deliveries", [
            # Keyed by (id, event_id) as the server has it; id still counts up by itself.
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            _ref("webhook_id", "namespace_webhooks.id", ondelete="CASCADE"),
            sa.Column("event_id", sa.LargeBinary(), primary_key=True),
            _varchar("error", nullable=True),
            sa.Column("event", sa.Integer(), nullable=False),
            _flag("redelivery", False),
            _varchar("request_headers", nullable=True),
            _varchar("request_body", nullable=True),
            sa.Column("response_code", sa.Integer(), nullable=True),
            _varchar("response_headers", nullable=True),
            _varchar("response_body", nullable=True),
            sa.Column("duration", sa.Integer(), nullable=False),
            _created(),
        ]),
        ("image_downloads", [
            _id(),
            _ref("image_id", "images.id", ondelete="CASCADE"),
            _varchar("source"),
            _varchar("error", nullable=True),
            _created(),
            _stamp("started_at", nullable=True),
            _stamp("finished_at", nullable=True),
        ]),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    for name, labels in ENUMS.items():
        if bind.execute(sa.text("SELECT to_regtype(:name)"), {"name": name}).scalar() is None:
            postgresql.ENUM(*labels, name=name).create(bind)
    present = set(sa.inspect(bind).get_table_names())
    for name, columns in _tables():
        if name not in present:
            op.create_table(name, *columns)


def downgrade() -> None:
    raise NotImplementedError("the worker never drops the Djinn server's tables")
