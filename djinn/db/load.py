"""Loading a build to run: its rows claimed and read in one statement, then decoded.

The claim is the lease's (djinn.db.lease); it is folded into the read here because
the common case, a queued build taken by the first worker that asks, is then one
round trip instead of two. Anything else (a build already running, finished, or
out of attempts) takes lease.claim's locking path and a plain read after it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, RowMapping, text
from sqlalchemy.orm import Session

from djinn.crypto import Cipher
from djinn.db.lease import MAX_ATTEMPTS, Lease, claim
from djinn.db.prepared import Prepared
from djinn.errors import DjinnError
from djinn.manifest import Passthrough
from djinn.plan import BuildPlan, JobPlan, StagePlan
from djinn.runner.engine import Key, Variable


@dataclass
class LoadedBuild:
    """Everything a run needs, read from the database in one go."""

    id: int
    user_id: int
    number: int
    secret: str
    driver_type: str
    driver_config: dict[str, Any]
    plan: BuildPlan
    job_ids: dict[tuple[str, str], int] = field(default_factory=dict)
    variables: list[Variable] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    objects: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: Whether anyone wants the build's start and finish events (a pull request or a
    #: namespace webhook). Most builds have neither, and then no notification query runs.
    wants_events: bool = False
    #: The user's own qemu image the manifest names, (user id, hash) of its `images` row.
    image: tuple[int, str] | None = None
    #: Seconds the build waited in the queue.
    waited: float = 0.0


# The build `b` with each child table folded into a JSON array.
_COLUMNS = """
    b.id, b.user_id, b.number, b.secret, d.type AS driver_type, d.config AS driver_config,
      extract(epoch FROM now() - b.created_at) AS waited,
      (EXISTS (SELECT 1 FROM build_triggers t WHERE t.build_id = b.id AND t.type = 'pull')
        OR EXISTS (SELECT 1 FROM namespace_webhooks w WHERE w.namespace_id = b.namespace_id)) AS wants_events,
      (SELECT json_agg(json_build_object('id', s.id, 'name', s.name, 'can_fail', s.can_fail) ORDER BY s.id)
         FROM build_stages s WHERE s.build_id = b.id) AS stages,
      (SELECT json_agg(json_build_object('id', j.id, 'stage_id', j.stage_id, 'name', j.name, 'commands', j.commands) ORDER BY j.id)
         FROM build_jobs j WHERE j.build_id = b.id) AS jobs,
      (SELECT json_agg(json_build_object('job_id', a.job_id, 'source', a.source, 'name', a.name) ORDER BY a.id)
         FROM build_artifacts a WHERE a.build_id = b.id) AS artifacts,
      (SELECT json_agg(json_build_object('source', o.source, 'name', o.name, 'user_id', ob.user_id, 'hash', ob.hash) ORDER BY o.id)
         FROM build_objects o LEFT JOIN objects ob ON ob.id = o.object_id WHERE o.build_id = b.id) AS objects,
      (SELECT json_build_object('user_id', i.user_id, 'hash', i.hash) FROM images i
         WHERE d.type = 'qemu' AND i.driver = 'qemu' AND i.name = d.config->>'image'
           AND CASE WHEN b.namespace_id IS NULL THEN i.user_id = b.user_id ELSE i.namespace_id = b.namespace_id END
         ORDER BY i.id LIMIT 1) AS image,
      (SELECT json_agg(json_build_object('key', v.key, 'value', v.value, 'masked', v.masked) ORDER BY v.id)
         FROM build_variables v WHERE v.build_id = b.id) AS variables,
      (SELECT json_agg(json_build_object('name', k.name, 'key', encode(k.key, 'base64'), 'config', k.config) ORDER BY k.id)
         FROM build_keys k WHERE k.build_id = b.id) AS keys
"""

# lease.claim's one-statement case (a queued build with attempts left) with the read after it.
CLAIM_AND_LOAD = Prepared(
    "djinn_claim_and_load",
    text(
    f"""
    WITH b AS (
      UPDATE builds SET status = 'running', worker = :worker, attempt = attempt + 1,
        heartbeat_at = now(), started_at = now(), error = NULL
      WHERE id = :id AND status = 'queued' AND attempt < :max_attempts
      RETURNING id, user_id, number, secret, namespace_id, created_at, attempt
    )
    SELECT b.attempt, {_COLUMNS}
    FROM b LEFT JOIN build_drivers d ON d.build_id = b.id
    """
    ),
)

LOAD = text(f"SELECT {_COLUMNS} FROM builds b LEFT JOIN build_drivers d ON d.build_id = b.id WHERE b.id = :id")


def claim_queued(conn: Connection | Session, build_id: int, worker: str) -> tuple[Lease, RowMapping] | None:
    """The common case alone: a queued build with attempts left, claimed and read in one statement.

    One statement is atomic by itself, so on a connection in autocommit this is a
    single round trip. None when the build is anything else (see `claim_and_load`).
    """
    connection = conn.connection() if isinstance(conn, Session) else conn
    params = {"id": build_id, "worker": worker, "max_attempts": MAX_ATTEMPTS}
    row: RowMapping | None = CLAIM_AND_LOAD.execute(connection, params).mappings().first()
    return (Lease(build_id, worker, row["attempt"]), row) if row is not None else None


def claim_and_load(session: Session, build_id: int, worker: str) -> tuple[Lease, RowMapping] | None:
    """Claim build `build_id` for `worker` and read its rows; None when it is not this worker's to run.

    Runs in the caller's transaction, so a claim whose read fails is rolled back with it.
    The row is undecoded (see `decode`): decrypting is the caller's, with the worker's key.
    """
    claimed = claim_queued(session, build_id, worker)
    if claimed is not None:
        return claimed
    lease = claim(session, build_id, worker)
    if lease is None:
        return None
    return lease, read(session, build_id)


def read(session: Session, build_id: int) -> RowMapping:
    """Build `build_id`'s rows as `claim_and_load` reads them, without claiming it."""
    row: RowMapping = session.execute(LOAD, {"id": build_id}).mappings().one()
    return row


def decode(row: RowMapping, cipher: Cipher | None) -> LoadedBuild:
    """A loaded row as a LoadedBuild, masked variables and keys decrypted with `cipher`."""
    artifacts: dict[int, list[Passthrough]] = {}
    for a in row["artifacts"] or []:
        artifacts.setdefault(a["job_id"], []).append(Passthrough(a["source"], a["name"]))
    jobs_by_stage: dict[int, list[dict[str, Any]]] = {}
    for job in row["jobs"] or []:
        jobs_by_stage.setdefault(job["stage_id"], []).append(job)
    job_ids: dict[tuple[str, str], int] = {}
    stages = []
    for stage in row["stages"] or []:
        jobs = []
        for job in jobs_by_stage.get(stage["id"], []):
            plan_job = JobPlan(
                stage["name"],
                job["name"],
                tuple(job["commands"].split("\n")) if job["commands"] else (),
                tuple(artifacts.get(job["id"], [])),
            )
            job_ids[plan_job.key] = job["id"]
            jobs.append(plan_job)
        stages.append(StagePlan(stage["name"], stage["can_fail"], tuple(jobs)))
    # As the server writes build_objects: `name` is the object's name, `source` where it goes.
    build_objects = row["objects"] or []
    objects = {o["name"]: (o["user_id"], o["hash"]) for o in build_objects if o["hash"] is not None}
    plan = BuildPlan(stages=tuple(stages), objects=tuple(Passthrough(o["name"], o["source"]) for o in build_objects))

    variables = []
    for var in row["variables"] or []:
        value = var["value"]
        if var["masked"]:
            if cipher is None:
                raise DjinnError("the build has masked variables but the worker config has no crypto block")
            value = cipher.decrypt_text(value)
        variables.append(Variable(var["key"], value, var["masked"]))
    keys = []
    for key in row["keys"] or []:
        if cipher is None:
            raise DjinnError("the build has keys but the worker config has no crypto block")
        keys.append(Key(key["name"], cipher.decrypt(base64.b64decode(key["key"])).decode(), key["config"] or ""))
    return LoadedBuild(
        id=row["id"],
        user_id=row["user_id"],
        number=row["number"],
        secret=row["secret"] or "",
        driver_type=row["driver_type"] or "",
        driver_config=dict(row["driver_config"]) if row["driver_type"] else {},
        plan=plan,
        job_ids=job_ids,
        variables=variables,
        keys=keys,
        objects=objects,
        wants_events=bool(row["wants_events"]),
        image=(row["image"]["user_id"], row["image"]["hash"]) if row["image"] else None,
        waited=float(row["waited"]),
    )
