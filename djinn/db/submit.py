"""Submitting a manifest: the rows the Djinn server writes for a build, in one transaction, then the build is queued.

The rows are those of the server's build.Store Create and Submit: the build and its
trigger; the driver (qemu with its arch); the owner's stored variables and keys
(namespace-wide or the owner's own, still encrypted) then the manifest's `env`;
the objects (`name` the object's name, `source` the destination path); the setup
stage `setup - #<number>` with `create-driver` and `clone.0`, `clone.1`, ...; the
manifest's stages and jobs; and an artifact row, with a hashid hash, per artifact.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from sqlalchemy import JSON, bindparam, delete, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from djinn.config import queue_for_driver
from djinn.crypto import Cipher, Hasher, hasher
from djinn.db.engine import autocommit, transaction
from djinn.db.models import (
    Build,
    BuildArtifact,
    BuildObject,
    Namespace,
    Object,
    User,
)
from djinn.db.prepared import Prepared
from djinn.errors import DjinnError
from djinn.manifest import Manifest, parse_manifest
from djinn.plan import SETUP_STAGE_PREFIX, plan_build
from djinn.runner.engine import Key, Variable

#: Owners `submit` creates without an address get one in this reserved domain (the
#: server wants a unique address per user); no mail is sent to it (djinn.notify.mail).
NO_MAIL_DOMAIN = "no-mail.invalid"


class SubmitError(DjinnError):
    """The build was refused; nothing was written."""


@dataclass(frozen=True)
class Submitted:
    id: int
    number: int
    queue: str
    #: What the manifest holds that the worker ignores (unknown keys), for the caller to show.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trigger:
    type: str = "manual"
    comment: str = ""
    data: dict[str, Any] | None = None
    provider_id: int | None = None
    repo_id: int | None = None


def queue_for(driver_type: str, driver: dict[str, str]) -> str:
    """The queue of a build's driver: qemu builds go by architecture."""
    if driver_type == "qemu":
        return queue_for_driver(f"qemu-{driver.get('arch', 'x86_64')}")
    return queue_for_driver(driver_type)


def queue_of(build: Build) -> str:
    """The queue a submitted build goes on (again)."""
    if build.driver is None:
        raise DjinnError(f"build {build.id} has no driver row; it cannot be queued")
    return queue_for(build.driver.type, build.driver.config)


def get_or_create_user(session: Session, username: str, email: str | None = None) -> User:
    """The user named `username`, locked so two submissions cannot take the same build number.

    A new user gets no password (b"": nothing matches it, so no one can log in to the
    server as them until an admin sets one).
    """
    user = session.scalar(select(User).where(User.username == username).with_for_update())
    if user is None:
        user = User(username=username, email=email or f"{username}@{NO_MAIL_DOMAIN}", password=b"")
        session.add(user)
        session.flush()
    elif email and user.email != email:
        user.email = email
    return user


#: The Djinn server makes namespaces at most this many levels deep (its namespace.MaxDepth).
NAMESPACE_MAX_DEPTH = 20


def _namespace(session: Session, user: User, path: str) -> Namespace:
    """The namespace `path` (or `path@owner`), created for the owner when new, as the server lays namespaces out.

    A root namespace is its own root at level 0; a child inherits its parent's root
    and visibility, one level deeper.
    """
    path, _, owner_name = path.partition("@")
    if len(path.split("/")) > NAMESPACE_MAX_DEPTH:
        raise SubmitError(f"namespace {path[:60]}...: nested more than {NAMESPACE_MAX_DEPTH} deep (the Djinn server's limit)")
    owner = user if not owner_name else session.scalar(select(User).where(User.username == owner_name))
    if owner is None:
        raise SubmitError(f"namespace {path}@{owner_name}: no user named {owner_name!r}")
    namespace = session.scalar(select(Namespace).where(Namespace.user_id == owner.id, Namespace.path == path))
    if namespace is None:
        parent = None
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            found = session.scalar(select(Namespace).where(Namespace.user_id == owner.id, Namespace.path == sub))
            if found is None:
                found = Namespace(
                    user_id=owner.id,
                    name=parts[depth - 1],
                    path=sub,
                    parent_id=parent.id if parent else None,
                    root_id=parent.root_id if parent else None,
                    level=parent.level + 1 if parent else 0,
                    visibility=parent.visibility if parent else "private",
                )
                session.add(found)
                session.flush()
                if found.root_id is None:
                    found.root_id = found.id
            parent = found
        namespace = parent
    assert namespace is not None  # the path has at least one name
    return namespace


def create_build(
    session: Session,
    manifest: Manifest,
    user: User,
    *,
    variables: Iterable[Variable] = (),
    keys: Iterable[Key] = (),
    cipher: Cipher | None = None,
    trigger: Trigger | None = None,
) -> Submitted:
    """Write the build and everything it needs, in `session`'s transaction (queueing it is the caller's)."""
    variables, keys = _given(manifest, variables, keys, cipher)

    namespace = _namespace(session, user, manifest.namespace) if manifest.namespace else None
    owner_id = namespace.user_id if namespace else user.id
    # As the server picks them: the owner's objects outside any namespace, or the build's namespace's.
    visible = (Object.user_id == owner_id) & Object.namespace_id.is_(None)
    if namespace is not None:
        visible = visible | (Object.namespace_id == namespace.id)
    objects = []
    for obj in manifest.objects:
        object_id = session.scalar(
            select(Object.id)
            .where(Object.name == obj.source, Object.deleted_at.is_(None), visible)
            .order_by(Object.id)
            .limit(1)
        )
        if object_id is None:
            raise SubmitError(f"objects: {user.username} has no object named {obj.source!r}")
        objects.append((obj, object_id))

    # A namespace's builds belong to its owner, as on the server. The submitter's row is
    # locked (get_or_create_user); the owner's is locked here, so the number is ours.
    owner = user if owner_id == user.id else session.scalar(select(User).where(User.id == owner_id).with_for_update())
    if owner is None:
        raise SubmitError(f"namespace owner {owner_id} does not exist")
    return _insert_rows(
        session.connection(), manifest, owner.id, namespace.id if namespace else None, objects, variables, keys, cipher, trigger or Trigger()
    )


def _given(
    manifest: Manifest, variables: Iterable[Variable], keys: Iterable[Key], cipher: Cipher | None
) -> tuple[list[Variable], list[Key]]:
    """The build's own variables (the manifest's, then the caller's) and keys; refused when they need a cipher and there is none."""
    variables = [Variable(k, v) for k, v in manifest.env] + list(variables)
    keys = list(keys)
    if cipher is None and (keys or any(v.masked for v in variables)):
        raise SubmitError("masked variables and keys are stored encrypted: add a crypto { block, salt } block to the worker config")
    return variables, keys


# The common submission (an existing user's build outside any namespace, with no
# objects) needs no ORM session: BEGIN and the owner's row lock go in one round trip,
# then INSERT_BUILD (a statement of its own, so its snapshot follows the lock), then COMMIT.
LOCK_USER = "BEGIN; SELECT id, email FROM users WHERE username = %(username)s FOR UPDATE"


def _submit_common(
    engine: Engine,
    manifest: Manifest,
    username: str,
    email: str | None,
    variables: Iterable[Variable],
    keys: Iterable[Key],
    cipher: Cipher | None,
    trigger: Trigger | None,
) -> Submitted | None:
    """The common case in three round trips; None, having written nothing, when it is not that case."""
    if manifest.namespace or manifest.objects:
        return None
    own_variables, own_keys = _given(manifest, variables, keys, cipher)
    with autocommit(engine) as conn:
        try:
            user = conn.exec_driver_sql(LOCK_USER, {"username": username}).first()
            if user is None or (email and user.email != email):  # a new user, or a new address: the ORM's
                conn.exec_driver_sql("ROLLBACK")
                return None
            submitted = _insert_rows(conn, manifest, user.id, None, [], own_variables, own_keys, cipher, trigger or Trigger())
            conn.exec_driver_sql("COMMIT")
            return submitted
        except BaseException:
            # The transaction is ours, not SQLAlchemy's: it must not go back to the pool open.
            try:
                conn.exec_driver_sql("ROLLBACK")
            except Exception:
                conn.invalidate()
            raise


# The build and the rows every build has, in one round trip. The number is the
# owner's next: the owner's row is locked by an earlier statement, so this one's
# snapshot sees every build numbered before. The setup stage's name holds the number
# (the first stage name is NULL: the statement names it). Stages and jobs arrive as
# arrays; their ids are drawn in array order (so stages run, and `job_ids` comes
# back, in that order) and a job names its stage by position. Variables and keys are
# the owner's stored ones (the owner's own outside any namespace, and every one of
# the build's namespace, as the server picks them; copied as stored, masked ones stay
# encrypted), then the given ones, in that order.
INSERT_BUILD = Prepared(
    "djinn_insert_build",
    text(
    """
    WITH b AS (
      INSERT INTO builds (user_id, namespace_id, number, manifest, status, secret)
      VALUES (:user_id, :namespace_id,
        (SELECT COALESCE(max(number), 0) + 1 FROM builds WHERE user_id = :user_id), :manifest, 'queued', :secret)
      RETURNING id, number
    ), driver AS (
      INSERT INTO build_drivers (build_id, type, config)
      SELECT id, CAST(:driver_type AS driver_type), CAST(:driver_config AS json) FROM b
    ), trig AS (
      INSERT INTO build_triggers (build_id, type, comment, data, provider_id, repo_id)
      SELECT id, CAST(:trigger_type AS trigger_type), :comment, CAST(:trigger_data AS json), :provider_id, :repo_id FROM b
    ), stage_rows AS MATERIALIZED (
      SELECT nextval(pg_get_serial_sequence('build_stages', 'id')) AS id, s.*
      FROM unnest(CAST(:stage_names AS text[]), CAST(:stage_can_fail AS boolean[])) WITH ORDINALITY AS s(name, can_fail, n)
    ), stages AS (
      INSERT INTO build_stages (id, build_id, name, can_fail)
      SELECT stage_rows.id, b.id, COALESCE(stage_rows.name, :setup_prefix || b.number), stage_rows.can_fail FROM b, stage_rows
    ), job_rows AS MATERIALIZED (
      SELECT nextval(pg_get_serial_sequence('build_jobs', 'id')) AS id, j.*
      FROM unnest(CAST(:job_stages AS integer[]), CAST(:job_names AS text[]), CAST(:job_commands AS text[]))
        WITH ORDINALITY AS j(stage, name, commands, n)
    ), jobs AS (
      INSERT INTO build_jobs (id, build_id, stage_id, name, commands, status)
      SELECT job_rows.id, b.id, stage_rows.id, job_rows.name, job_rows.commands, CAST('queued' AS status)
      FROM b, job_rows JOIN stage_rows ON stage_rows.n = job_rows.stage
    ), build_vars AS (
      INSERT INTO build_variables (build_id, variable_id, key, value, masked)
      SELECT b.id, v.variable_id, v.key, v.value, v.masked FROM b, (
        SELECT 0 AS part, id AS n, id AS variable_id, key, value, COALESCE(masked, false) AS masked FROM variables
        WHERE (user_id = :user_id AND namespace_id IS NULL) OR namespace_id = :namespace_id
        UNION ALL
        SELECT 1, g.n, NULL, g.key, g.value, g.masked
        FROM unnest(CAST(:var_keys AS text[]), CAST(:var_values AS text[]), CAST(:var_masked AS boolean[]))
          WITH ORDINALITY AS g(key, value, masked, n)
      ) v ORDER BY v.part, v.n
    ), build_keys_rows AS (
      INSERT INTO build_keys (build_id, key_id, name, key, config, location)
      SELECT b.id, k.key_id, k.name, k.key, k.config, '/root/.ssh/' || k.name FROM b, (
        SELECT 0 AS part, id AS n, id AS key_id, name, key, config FROM keys
        WHERE (user_id = :user_id AND namespace_id IS NULL) OR namespace_id = :namespace_id
        UNION ALL
        SELECT 1, g.n, NULL, g.name, g.key, g.config
        FROM unnest(CAST(:key_names AS text[]), CAST(:key_keys AS bytea[]), CAST(:key_configs AS text[]))
          WITH ORDINALITY AS g(name, key, config, n)
      ) k ORDER BY k.part, k.n
    )
    SELECT b.id, b.number, ARRAY(SELECT id FROM job_rows ORDER BY n) AS job_ids FROM b
    """
    ).bindparams(bindparam("driver_config", type_=JSON), bindparam("trigger_data", type_=JSON)),
)


def _sealing(cipher: Cipher | None) -> Cipher:
    """The cipher masked values and keys are stored with (create_build refused to go on without one)."""
    if cipher is None:
        raise SubmitError("masked variables and keys need the crypto block in the worker config")
    return cipher


def _insert_rows(
    conn: Connection,
    manifest: Manifest,
    owner_id: int,
    namespace_id: int | None,
    objects: list[tuple[Any, int]],
    variables: list[Variable],
    keys: list[Key],
    cipher: Cipher | None,
    trigger: Trigger,
) -> Submitted:
    """The server's rows for a build: INSERT_BUILD, then one multi-row INSERT per optional table."""
    stages = plan_build(manifest).stages  # the setup stage is named by INSERT_BUILD, which knows the number
    jobs = [(n, job) for n, stage in enumerate(stages, start=1) for job in stage.jobs]
    driver = dict(manifest.driver)
    if manifest.driver_type == "qemu":
        driver.setdefault("arch", "x86_64")  # the server records the arch it queues qemu builds by
    row = INSERT_BUILD.execute(
        conn,
        {
            "user_id": owner_id,
            "namespace_id": namespace_id,
            "manifest": manifest.text,
            "secret": secrets.token_hex(16),
            "driver_type": manifest.driver_type,
            "driver_config": driver,
            "trigger_type": trigger.type,
            "comment": trigger.comment,
            "trigger_data": trigger.data or {},
            "provider_id": trigger.provider_id,
            "repo_id": trigger.repo_id,
            "setup_prefix": SETUP_STAGE_PREFIX,
            "stage_names": [None if n == 0 else s.name for n, s in enumerate(stages)],  # the setup stage comes first
            "stage_can_fail": [s.can_fail for s in stages],
            "job_stages": [n for n, _ in jobs],
            "job_names": [job.name for _, job in jobs],
            "job_commands": ["\n".join(job.commands) for _, job in jobs],
            "var_keys": [v.key for v in variables],
            "var_values": [_sealing(cipher).encrypt_text(v.value) if v.masked else v.value for v in variables],
            "var_masked": [v.masked for v in variables],
            "key_names": [k.name for k in keys],
            "key_keys": [_sealing(cipher).encrypt(k.key.encode()) for k in keys],
            "key_configs": [k.config for k in keys],
        },
    ).one()
    build_id, number, job_ids = row.id, row.number, row.job_ids
    # As the server writes them: name = the object's name, source = where it goes in the build.
    rows = [
        {"build_id": build_id, "object_id": object_id, "name": o.source, "source": o.destination, "placed": False}
        for o, object_id in objects
    ]
    if rows:
        conn.execute(insert(BuildObject), rows)

    hashes: Hasher = hasher(cipher.settings if cipher is not None else None)
    rows = [
        {
            "user_id": owner_id,
            "build_id": build_id,
            "job_id": job_id,
            "hash": hashes.hash_now(),
            "source": artifact.source,
            "name": artifact.destination,
        }
        for job_id, (_, job) in zip(job_ids, jobs, strict=True)
        for artifact in job.artifacts
    ]
    if rows:
        conn.execute(insert(BuildArtifact), rows)
    return Submitted(build_id, number, queue_for(manifest.driver_type, driver))


def submit(
    sessions: sessionmaker[Session],
    manifest_text: str,
    *,
    username: str,
    email: str | None = None,
    variables: Iterable[Variable] = (),
    keys: Iterable[Key] = (),
    cipher: Cipher | None = None,
    trigger: Trigger | None = None,
    enqueue: Callable[[int, str], None],
    manifest_path: str | None = None,
) -> Submitted:
    """Validate, write and queue a build. Invalid input raises before anything is written."""
    manifest = parse_manifest(manifest_text, manifest_path)
    variables, keys = list(variables), list(keys)  # read twice when the common case does not apply
    engine = sessions.kw.get("bind")
    submitted = (
        _submit_common(engine, manifest, username, email, variables, keys, cipher, trigger) if isinstance(engine, Engine) else None
    )
    if submitted is None:
        with transaction(sessions) as session:
            user = get_or_create_user(session, username, email)
            submitted = create_build(session, manifest, user, variables=variables, keys=keys, cipher=cipher, trigger=trigger)
    try:
        enqueue(submitted.id, submitted.queue)
    except Exception as exc:
        # Queued only once committed, so a worker never sees a build it cannot read;
        # when the broker refuses, the build is taken back rather than left queued forever.
        with transaction(sessions) as session:
            session.execute(delete(Build).where(Build.id == submitted.id))
        raise SubmitError(f"cannot queue the build on {submitted.queue}: {exc}") from None
    return replace(submitted, warnings=manifest.warnings)
