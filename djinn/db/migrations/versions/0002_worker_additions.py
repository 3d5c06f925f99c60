"""What the worker adds to the Djinn server's schema: the lease, output chunks, notification markers

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:45:00

Every change only adds, and each is made only when missing, so this runs on a
database the server made (and then again) without touching the server's columns,
enum labels or rows. New columns on the server's tables are nullable or have a
default, so the server's INSERTs, which do not name them, keep working.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The role the server's revisions/perms give its Go worker. When it exists, it is
# granted the worker's new tables, so it can run this worker too.
WORKER_ROLE = "djinn_worker"

# Index name -> (table, column): lookups the worker makes on every build.
INDEXES = {
    "ix_builds_status": ("builds", "status"),
    "ix_build_stages_build_id": ("build_stages", "build_id"),
    "ix_build_jobs_build_id": ("build_jobs", "build_id"),
    "ix_build_artifacts_build_id": ("build_artifacts", "build_id"),
    "ix_build_objects_build_id": ("build_objects", "build_id"),
    "ix_build_variables_build_id": ("build_variables", "build_id"),
    "ix_build_keys_build_id": ("build_keys", "build_id"),
    "ix_build_drivers_build_id": ("build_drivers", "build_id"),
    "ix_build_triggers_build_id": ("build_triggers", "build_id"),
    "ix_build_tags_build_id": ("build_tags", "build_id"),
    "ix_namespace_webhooks_namespace_id": ("namespace_webhooks", "namespace_id"),
    "ix_images_name": ("images", "name"),
}


def upgrade() -> None:
    bind = op.get_bind()
    # The worker's own driver; the server knows ssh, qemu and docker. A label is
    # appended to the type, so no existing value changes.
    op.execute("ALTER TYPE driver_type ADD VALUE IF NOT EXISTS 'os'")

    # The lease (SPEC section 5).
    op.execute(
        "ALTER TABLE builds"
        " ADD COLUMN IF NOT EXISTS attempt INTEGER NOT NULL DEFAULT 0,"
        " ADD COLUMN IF NOT EXISTS worker VARCHAR NULL,"
        " ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMP NULL,"
        " ADD COLUMN IF NOT EXISTS error TEXT NULL"
    )
    for name, (table, column) in INDEXES.items():
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column})")

    existing = set(sa.inspect(bind).get_table_names())
    if "build_job_output" not in existing:
        op.create_table(
            "build_job_output",
            sa.Column("id", sa.BigInteger(), primary_key=True),
            sa.Column("build_id", sa.Integer(), sa.ForeignKey("builds.id", ondelete="CASCADE"), nullable=False),
            sa.Column("job_id", sa.Integer(), sa.ForeignKey("build_jobs.id", ondelete="CASCADE"), nullable=False),
            sa.Column("data", sa.Text(), nullable=False),
        )
        op.create_index("ix_build_job_output_build_id_id", "build_job_output", ["build_id", "id"])
    if "build_notifications" not in existing:
        op.create_table(
            "build_notifications",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("build_id", sa.Integer(), sa.ForeignKey("builds.id", ondelete="CASCADE"), nullable=False),
            sa.Column("kind", sa.String(32), nullable=False),
            sa.Column("state", sa.String(32), nullable=False, server_default="pending"),
            sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=False), nullable=False, server_default=sa.text("now()")),
            sa.Column("updated_at", sa.DateTime(timezone=False), nullable=False, server_default=sa.text("now()")),
            sa.Column("sent_at", sa.DateTime(timezone=False), nullable=True),
            sa.UniqueConstraint("build_id", "kind", name="uq_build_notifications_build_id"),
        )
        op.create_index("ix_build_notifications_kind_state", "build_notifications", ["kind", "state"])
        # Builds that failed before this worker mailed anyone are not mailed now: the
        # sweep that catches mails a dead worker left behind must not mail history.
        op.execute(
            "INSERT INTO build_notifications (build_id, kind, state, error) "
            "SELECT id, 'mail', 'skipped', 'finished before failure mail existed' FROM builds "
            "WHERE status IN ('failed', 'killed', 'timed_out')"
        )

    if bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": WORKER_ROLE}).first():
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON build_job_output, build_notifications TO {WORKER_ROLE}")
        op.execute(f"GRANT USAGE ON SEQUENCE build_job_output_id_seq, build_notifications_id_seq TO {WORKER_ROLE}")


def downgrade() -> None:
    op.drop_table("build_notifications")
    op.drop_table("build_job_output")
    op.execute("ALTER TABLE builds DROP COLUMN error, DROP COLUMN heartbeat_at, DROP COLUMN worker, DROP COLUMN attempt")
