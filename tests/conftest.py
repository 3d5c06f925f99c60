"""Shared test helpers."""

from __future__ import annotations

# Fixture modules: registered once here so a session fixture (a server) starts once.
pytest_plugins = ["worker_support", "sshd_support", "docker_support", "qemu_support", "notify_support"]

import fcntl
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

# Tests that start docker-driver workers share the machine's one Docker engine, and a
# worker's start-up sweep removes every djinn container of builds its own database
# does not know: under pytest-xdist (scripts/test runs two processes) they all run in
# one process, one at a time. Everything else owns its servers and may run beside them.
DOCKER_ENGINE = "docker-engine"
DOCKER_ENGINE_MODULES = {"test_docker_driver", "test_drivers_worker", "test_djinn_server", "test_metrics", "test_shutdown"}
# Tests that boot VMs take turns too: on two cores one VM boots in seconds, while two or
# three booting beside the rest of the suite take minutes and run into the tests' timeouts.
QEMU_VMS = "qemu-vms"
GROUPS = (DOCKER_ENGINE, QEMU_VMS)
# Held by each test of a group while it runs: should the scheduler ever spread a
# group (pytest-xdist's loadgroup once did, silently, under a newer pytest), its tests
# still take turns instead of sweeping each other's containers or starving each other's VMs.
GROUP_LOCKS = {group: Path(tempfile.gettempdir()) / f"djinn-tests-{group}.lock" for group in GROUPS}


def group_of(item) -> str | None:
    fixtures = getattr(item, "fixturenames", ())
    if "docker_api" in fixtures:
        return DOCKER_ENGINE
    if "qemu_image" in fixtures:  # a qemu worker's sweep leaves Docker alone: its VMs are what it shares
        return QEMU_VMS
    return DOCKER_ENGINE if item.module.__name__ in DOCKER_ENGINE_MODULES else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the group
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        group = group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _group_turn(request) -> Iterator[None]:
    """An autouse fixture is set up first and torn down last: the turn covers the test's workers."""
    marker = request.node.get_closest_marker("xdist_group")
    group = next((g for g in GROUPS if marker is not None and g in marker.args), None)
    if group is None:
        yield
        return
    with open(GROUP_LOCKS[group], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


from djinn.plan import JobPlan
from djinn.runner.engine import Reporter
from djinn.status import Status


class RecordingReporter(Reporter):
    """Keeps every callback so tests can check what the runner told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.output: dict[str, bytearray] = {}
        self.statuses: dict[str, Status] = {}
        self.ran: dict[str, bool] = {}
        self.artifacts: list[tuple[str, str, object]] = []
        self.final: Status | None = None
        self.started = threading.Event()
        self.job_running = threading.Event()

    def build_started(self) -> None:
        self.events.append(("build_started",))
        self.started.set()

    def job_started(self, job: JobPlan) -> None:
        self.events.append(("job_started", job.name))
        self.output.setdefault(job.name, bytearray())
        self.job_running.set()

    def job_output(self, job: JobPlan, data: bytes) -> None:
        self.output.setdefault(job.name, bytearray()).extend(data)

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        self.events.append(("job_finished", job.name, status, ran))
        self.statuses[job.name] = status
        self.ran[job.name] = ran

    def artifact_stored(self, job, source, artifact) -> None:
        self.artifacts.append((job.name, source, artifact))

    def build_finished(self, status: Status) -> None:
        self.events.append(("build_finished", status))
        self.final = status

    def text(self, job: str) -> str:
        return bytes(self.output.get(job, b"")).decode()


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()
