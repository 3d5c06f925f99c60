"""Submitting a manifest: every row of SPEC section 2 in one transaction, then the build is queued."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Iterable

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from djinn.config import queue_for_driver
from djinn.crypto import Cipher
from djinn.db import transaction
from djinn.errors import DjinnError
from djinn.manifest import Manifest, parse_manifest
from djinn.models import (
    Build,
    BuildArtifact,
    BuildDriver,
    BuildJob,
    BuildKey,
    BuildObject,
    BuildStage,
    BuildTrigger,
    BuildVariable,
    Namespace,
    Object,
    User,
)
from djinn.plan import plan_build
from djinn.runner import Key, Variable


class SubmitError(DjinnError):
    """The build was refused; nothing was written."""


@dataclass(frozen=True)
class Submitted:
    id: int
    number: int
    queue: str


@dataclass(frozen=True)
class Created:
    id: int
    number: int


@dataclass(frozen=True)
class Trigger:
    type: str = "manual"
    comment: str = ""
    data: dict | None = None
    provider_id: int | None = None
    repo_id: int | None = None


def queue_for(driver_type: str, driver: dict[str, str]) -> str:
    """The queue of a build's driver: qemu builds go by architecture."""
    if driver_type == "qemu":
        return queue_for_driver(f"qemu-{driver.get('arch', 'x86_64')}")
    return queue_for_driver(driver_type)


def get_or_create_user(session: Session, username: str, email: str | None = None) -> User:
    """The user named `username`, locked so two submissions cannot take the same build number."""
    user = session.scalar(select(User).where(User.username == username).with_for_update())
    if user is None:
        user = User(username=username, email=email)
        session.add(user)
        session.flush()
    elif email and user.email != email:
        user.email = email
    return user


def _namespace(session: Session, user: User, path: str) -> Namespace:
    """The namespace `path` (or `path@owner`), created for the owner when new."""
    path, _, owner_name = path.partition("@")
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
                    root_id=(parent.root_id or parent.id) if parent else None,
                )
                session.add(found)
                session.flush()
            parent = found
        namespace = parent
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
) -> Created:
    """Write the build and everything it needs, in `session`'s transaction."""
    variables = [Variable(k, v) for k, v in manifest.env] + list(variables)
    keys = list(keys)
    if cipher is None and (keys or any(v.masked for v in variables)):
        raise SubmitError("masked variables and keys are stored encrypted: add a crypto { block, salt } block to the worker config")

    # The caller holds the user row's lock (get_or_create_user), so the number is ours.
    number = (session.scalar(select(func.max(Build.number)).where(Build.user_id == user.id)) or 0) + 1

    namespace = _namespace(session, user, manifest.namespace) if manifest.namespace else None
    objects = []
    for obj in manifest.objects:
        object_id = session.scalar(
            select(Object.id).where(Object.user_id == user.id, Object.name == obj.source, Object.deleted_at.is_(None))
        )
        if object_id is None:
            raise SubmitError(f"objects: {user.username} has no object named {obj.source!r}")
        objects.append((obj, object_id))

    return _insert_rows(session, manifest, user, number, namespace, objects, variables, keys, cipher, trigger or Trigger())


def _insert_rows(session, manifest, user, number, namespace, objects, variables, keys, cipher, trigger) -> Created:
    """The rows of SPEC section 2, one multi-row INSERT a table (ORM units of work cost more than the SQL)."""
    build_id = session.execute(
        insert(Build)
        .values(
            user_id=user.id,
            namespace_id=namespace.id if namespace else None,
            number=number,
            manifest=manifest.text,
            status="queued",
            secret=secrets.token_hex(16),
        )
        .returning(Build.id)
    ).scalar_one()
    session.execute(insert(BuildDriver).values(build_id=build_id, type=manifest.driver_type, config=dict(manifest.driver)))
    session.execute(
        insert(BuildTrigger).values(
            build_id=build_id,
            type=trigger.type,
            comment=trigger.comment,
            data=trigger.data or {},
            provider_id=trigger.provider_id,
            repo_id=trigger.repo_id,
        )
    )
    rows = [
        {"build_id": build_id, "key": v.key, "value": cipher.encrypt_text(v.value) if v.masked else v.value, "masked": v.masked}
        for v in variables
    ]
    if rows:
        session.execute(insert(BuildVariable), rows)
    rows = [
        {"build_id": build_id, "name": k.name, "key": cipher.encrypt(k.key.encode()), "config": k.config, "location": f"/root/.ssh/{k.name}"}
        for k in keys
    ]
    if rows:
        session.execute(insert(BuildKey), rows)
    rows = [{"build_id": build_id, "object_id": object_id, "source": o.source, "name": o.destination, "placed": False} for o, object_id in objects]
    if rows:
        session.execute(insert(BuildObject), rows)

    stages = plan_build(manifest, number).stages
    stage_ids = session.scalars(
        insert(BuildStage).returning(BuildStage.id, sort_by_parameter_order=True),
        [{"build_id": build_id, "name": s.name, "can_fail": s.can_fail} for s in stages],
    ).all()
    jobs = [(stage_id, job) for stage_id, stage in zip(stage_ids, stages) for job in stage.jobs]
    job_ids = session.scalars(
        insert(BuildJob).returning(BuildJob.id, sort_by_parameter_order=True),
        [
            {"build_id": build_id, "stage_id": stage_id, "name": job.name, "commands": "\n".join(job.commands), "status": "queued"}
            for stage_id, job in jobs
        ],
    ).all()
    rows = [
        {
            "user_id": user.id,
            "build_id": build_id,
            "job_id": job_id,
            "hash": secrets.token_hex(16),
            "source": artifact.source,
            "name": artifact.destination,
        }
        for job_id, (_, job) in zip(job_ids, jobs)
        for artifact in job.artifacts
    ]
    if rows:
        session.execute(insert(BuildArtifact), rows)
    return Created(build_id, number)


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
    queue = queue_for(manifest.driver_type, manifest.driver)
    with transaction(sessions) as session:
        user = get_or_create_user(session, username, email)
        build = create_build(session, manifest, user, variables=variables, keys=keys, cipher=cipher, trigger=trigger)
        submitted = Submitted(build.id, build.number, queue)
    try:
        enqueue(submitted.id, queue)
    except Exception as exc:
        # Queued only once committed, so a worker never sees a build it cannot read;
        # when the broker refuses, the build is taken back rather than left queued forever.
        with transaction(sessions) as session:
            session.execute(delete(Build).where(Build.id == submitted.id))
        raise SubmitError(f"cannot queue the build on {queue}: {exc}") from None
    return submitted
