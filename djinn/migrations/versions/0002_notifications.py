"""notifications: providers, provider repos, namespace webhooks and deliveries, build notification markers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("provider_user_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("access_token", sa.LargeBinary(), nullable=True),
        sa.Column("refresh_token", sa.LargeBinary(), nullable=True),
        sa.Column("connected", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("main_account", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_providers_user_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_providers")),
    )
    op.create_table(
        "provider_repos",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("hook_id", sa.BigInteger(), nullable=True),
        sa.Column("repo_id", sa.BigInteger(), nullable=False),
        sa.Column("provider_name", sa.String(length=32), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("href", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["provider_id"], ["providers.id"], name=op.f("fk_provider_repos_provider_id"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_provider_repos_user_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_repos")),
    )
    op.create_table(
        "namespace_webhooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("author_id", sa.Integer(), nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("payload_url", sa.Text(), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=True),
        sa.Column("ssl", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["author_id"], ["users.id"], name=op.f("fk_namespace_webhooks_author_id"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["namespace_id"], ["namespaces.id"], name=op.f("fk_namespace_webhooks_namespace_id"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_namespace_webhooks_user_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_namespace_webhooks")),
    )
    op.create_index(op.f("ix_namespace_webhooks_namespace_id"), "namespace_webhooks", ["namespace_id"], unique=False)
    op.create_table(
        "namespace_webhook_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("redelivery", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("request_headers", sa.Text(), nullable=True),
        sa.Column("request_body", sa.Text(), nullable=True),
        sa.Column("response_code", sa.Integer(), nullable=True),
        sa.Column("response_headers", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("duration", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["namespace_webhooks.id"], name=op.f("fk_namespace_webhook_deliveries_webhook_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_namespace_webhook_deliveries")),
    )
    op.create_index(
        "ix_namespace_webhook_deliveries_webhook_id_event_id", "namespace_webhook_deliveries", ["webhook_id", "event_id"], unique=False
    )
    op.create_table(
        "build_notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["build_id"], ["builds.id"], name=op.f("fk_build_notifications_build_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_build_notifications")),
        sa.UniqueConstraint("build_id", "kind", name=op.f("uq_build_notifications_build_id")),
    )
    op.create_index("ix_build_notifications_kind_state", "build_notifications", ["kind", "state"], unique=False)
    # Builds that failed before this worker mailed anyone are not mailed now: the
    # sweep that catches mails a dead worker left behind must not mail history.
    op.execute(
        "INSERT INTO build_notifications (build_id, kind, state, error) "
        "SELECT id, 'mail', 'skipped', 'finished before failure mail existed' FROM builds "
        "WHERE status IN ('failed', 'killed', 'timed_out')"
    )


def downgrade() -> None:
    op.drop_index("ix_build_notifications_kind_state", table_name="build_notifications")
    op.drop_table("build_notifications")
    op.drop_index("ix_namespace_webhook_deliveries_webhook_id_event_id", table_name="namespace_webhook_deliveries")
    op.drop_table("namespace_webhook_deliveries")
    op.drop_index(op.f("ix_namespace_webhooks_namespace_id"), table_name="namespace_webhooks")
    op.drop_table("namespace_webhooks")
    op.drop_table("provider_repos")
    op.drop_table("providers")
