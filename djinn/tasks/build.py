"""The build task: the Celery edge around djinn.execute.run_build."""

from __future__ import annotations

from celery import shared_task

from djinn import context
from djinn.execute import run_build
from djinn.queue import RUN_BUILD


@shared_task(name=RUN_BUILD, acks_late=True, ignore_result=True)
def run_build_task(build_id: int) -> str | None:
    """Run one build, given only its id: everything else is read from the database."""
    status = run_build(context.current(), int(build_id))
    return status.value if status is not None else None
