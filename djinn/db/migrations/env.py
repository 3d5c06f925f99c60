"""Alembic environment: djinn runs migrations on a connection it hands over (djinn.db.migrate)."""

from __future__ import annotations

from alembic import context

from djinn.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `djinn-worker migrate -config FILE`")

context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
