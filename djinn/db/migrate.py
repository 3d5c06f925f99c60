"""Creating and upgrading the schema with the Alembic migrations shipped in djinn/migrations.

On a Djinn server's database the migrations only add what the worker needs; on an
empty one they create the server's tables first (see the revisions' docstrings).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from djinn.errors import DjinnError

MIGRATIONS = Path(__file__).with_name("migrations")
# PostgreSQL's SQLSTATE for "permission denied" (insufficient_privilege).
INSUFFICIENT_PRIVILEGE = "42501"


class MigrateError(DjinnError):
    """The schema could not be changed; nothing was changed."""


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to `revision`, in one transaction; idempotent. Returns (revision before, revision after).

    A role that may not change the schema (the server gives its worker role none)
    gets a MigrateError saying so, and the transaction is rolled back.
    """
    config = alembic_config()
    try:
        with engine.begin() as connection:
            _refuse_old_layout(connection)
            before = MigrationContext.configure(connection).get_current_revision()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            after = MigrationContext.configure(connection).get_current_revision()
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) != INSUFFICIENT_PRIVILEGE:
            raise
        role, database = engine.url.username or "(default)", engine.url.database
        raise MigrateError(
            f"migrate: role {role} may not change the schema of database {database}: "
            "run migrate as the database owner or an admin role"
        ) from None
    return before, after


def _refuse_old_layout(connection: Connection) -> None:
    """Databases made by worker releases before the server's schema was adopted cannot be upgraded in place."""
    old = connection.execute(text("SELECT to_regtype('build_status') IS NOT NULL AND to_regtype('status') IS NULL")).scalar()
    if old:
        raise MigrateError(
            f"migrate: database {connection.engine.url.database} has the tables of an earlier djinn-worker release "
            "(enum build_status), not the Djinn server's schema: migrate a new, empty database and move the builds over"
        )


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
