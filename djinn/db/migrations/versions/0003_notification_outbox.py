"""notification outbox: commit statuses and webhook deliveries owed for build events, sent from the record

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Only its own new table: the foreign keys point at upstream's builds and
    # namespace_webhooks, which earlier revisions (or the Djinn server) made.
    op.create_table(
        "notification_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=True),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=32), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=False), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=False), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=False), server_default=sa.text("now()"), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=False), nullable=True),
        sa.ForeignKeyConstraint(["build_id"], ["builds.id"], name=op.f("fk_notification_outbox_build_id"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["namespace_webhooks.id"], name=op.f("fk_notification_outbox_webhook_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_outbox")),
    )
    op.create_index("ix_notification_outbox_state_due_at", "notification_outbox", ["state", "due_at"], unique=False)
    op.create_index("ix_notification_outbox_build_id", "notification_outbox", ["build_id"], unique=False)
    # The Djinn server's worker role (revisions/perms) may use the worker's tables, as in 0002.
    if op.get_bind().execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'djinn_worker'")).first():
        op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON notification_outbox TO djinn_worker")
        op.execute("GRANT USAGE ON SEQUENCE notification_outbox_id_seq TO djinn_worker")


def downgrade() -> None:
    op.drop_index("ix_notification_outbox_build_id", table_name="notification_outbox")
    op.drop_index("ix_notification_outbox_state_due_at", table_name="notification_outbox")
    op.drop_table("notification_outbox")
