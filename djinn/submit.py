"""Submitting a manifest: every row of SPEC section 2 in one transaction, then the build is queued."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Iterable

from sqlalchemy import delete, func, select
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
) -> Build:
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

    # Built as one object graph with no query in between, and written in one flush:
    # a few multi-row INSERTs.
    with session.no_autoflush:
        return _build_graph(session, manifest, user, number, namespace, objects, variables, keys, cipher, trigger)


def _build_graph(session, manifest, user, number, namespace, objects, variables, keys, cipher, trigger) -> Build:
    build = Build(
        user_id=user.id,
        namespace_id=namespace.id if namespace else None,
        number=number,
        manifest=manifest.text,
        status="queued",
        secret=secrets.token_hex(16),
    )
    session.add(build)

    build.driver = BuildDriver(type=manifest.driver_type, config=dict(manifest.driver))
    t = trigger or Trigger()
    build.trigger = BuildTrigger(type=t.type, comment=t.comment, data=t.data or {}, provider_id=t.provider_id, repo_id=t.repo_id)
    for var in variables:
        value = cipher.encrypt_text(var.value) if var.masked and cipher else var.value
        build.variables.append(BuildVariable(key=var.key, value=value, masked=var.masked))
    for key in keys:
        build.keys.append(
            BuildKey(name=key.name, key=cipher.encrypt(key.key.encode()), config=key.config, location=f"/root/.ssh/{key.name}")
        )
    for obj, object_id in objects:
        build.objects.append(BuildObject(object_id=object_id, source=obj.source, name=obj.destination))

    for stage_plan in plan_build(manifest, number).stages:
        stage = BuildStage(name=stage_plan.name, can_fail=stage_plan.can_fail)
        build.stages.append(stage)
        for job_plan in stage_plan.jobs:
            job = BuildJob(name=job_plan.name, commands="\n".join(job_plan.commands), status="queued")
            stage.jobs.append(job)
            build.jobs.append(job)
            for artifact in job_plan.artifacts:
                row = BuildArtifact(user_id=user.id, hash=secrets.token_hex(16), source=artifact.source, name=artifact.destination)
                job.artifacts.append(row)
                build.artifacts.append(row)
    session.flush()
    return build


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
