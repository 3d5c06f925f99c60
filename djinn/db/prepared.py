"""Statements PostgreSQL plans once per connection rather than at every run.

A build's hot statements (its INSERT, its claim, its final write) are long CTEs
that PostgreSQL takes longer to plan than to run: about a millisecond each on a
small machine, for every build. Each is PREPAREd on a connection the first time
that connection runs it and EXECUTEd by name from then on; after a few runs
PostgreSQL keeps a generic plan and plans it no more. Like the Djinn server,
whose driver (pgx) caches prepared statements too, this needs a session per
connection: a PgBouncer in front of PostgreSQL must pool sessions, not
transactions.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from sqlalchemy import Connection, CursorResult, TextClause
from sqlalchemy.dialects.postgresql import psycopg2

_DIALECT = psycopg2.dialect()  # type: ignore[no-untyped-call]
_PARAM = re.compile(r"%\((\w+)\)s")
#: Where a connection's `info` lists the statements prepared on it (cleared with a new connection).
_INFO_KEY = "djinn_prepared"


class Prepared:
    """`statement` (a text() with :named parameters), run on a connection as a prepared statement."""

    def __init__(self, name: str, statement: TextClause) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        order: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        sql = _PARAM.sub(positional, compiled.string)
        if "%" in sql:  # it is sent without parameters, so a % would need escaping one way and not the other
            raise ValueError(f"prepared statement {name}: no % outside parameters, please")
        self.name = name
        self.params = tuple(order)
        self._prepare = f"PREPARE {name} AS {sql}"
        self._execute = f"EXECUTE {name} (" + ", ".join(f"%({p})s" for p in order) + ")" if order else f"EXECUTE {name}"
        # What SQLAlchemy would do to a value before sending it (JSON: serialize).
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for key, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
            if processor is not None:
                self._processors[key] = processor

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> CursorResult[Any]:
        prepared: set[str] = conn.connection.info.setdefault(_INFO_KEY, set())
        if self.name not in prepared:
            # Not transactional: a prepared statement outlives a rollback of the transaction that made it.
            conn.exec_driver_sql(self._prepare)
            prepared.add(self.name)
        values = {p: self._processors[p](params[p]) if p in self._processors else params[p] for p in self.params}
        return conn.exec_driver_sql(self._execute, values)
