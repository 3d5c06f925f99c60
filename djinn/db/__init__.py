"""Everything the worker keeps in PostgreSQL: the build rows and what reads and writes them.

engine (connections, transactions, waiting out outages) -> models (the server's
tables and the worker's own) -> submit (a manifest becomes rows), lease (claim,
heartbeat, give-back and requeue), recorder (a run's progress and output);
migrate and migrations/ create and upgrade the schema.
"""
