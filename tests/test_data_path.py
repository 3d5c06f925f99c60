"""A build's walk through the code, traced on a real build: the task hands it down a short path and nothing calls back up.

Every call on the build's own thread that receives the build (its id, or an object
holding it: a lease, a driver's identity, a reporter) is recorded with the file it
enters. The files are either stops on the data path (README, "Layout"), where the
build is handed on, or the run's controls and observers, which only answer or
record and hand it to nobody on the path. A new file on the walk fails this test
until it is placed in one of the two.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from djinn.worker import context

ROOT = Path(__file__).resolve().parent.parent / "djinn"

# The build's path, in order: one stop a file (a driver package is one stop: the
# driver). The build only ever moves forward along it.
PATH = {
    "tasks/build.py": "the Celery task",
    "worker/execute.py": "the orchestrator: claim, run, final write",
    "db/load.py": "the claim and the build's rows, read",
    "runner/engine.py": "the plan run on the driver, told to the reporters",
    "drivers/": "the driver",
    "db/recorder.py": "jobs, output, artifacts and the final write",
    "runner/store.py": "the files of objects and artifacts",
}
# Asked or told along the way, never handing the build on to a stop of the path.
CONTROLS_AND_OBSERVERS = {
    "db/lease.py": "the lease: beats, and whether a write may still land",
    "runner/control.py": "why a run stops",
    "worker/kill.py": "the kill watch",
    "observe/logs.py": "log lines name the build",
    "observe/metrics.py": "job timings",
}

WITH_ARTIFACT = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ["echo made > made.txt", "echo done"]
    artifacts: ["made.txt"]
"""


def stop_of(path: str) -> str:
    return "drivers/" if path.startswith("drivers/") else path


def holds_build(value: object, build_id: int) -> bool:
    for candidate in (value, getattr(value, "build_id", None), getattr(getattr(value, "lease", None), "build_id", None),
                      getattr(getattr(value, "identity", None), "build_id", None)):
        if candidate is not None and not isinstance(candidate, bool) and str(candidate) == str(build_id):
            return True
    return False


class Walk:
    """The build-carrying calls of one thread: (from file, into file) moves, and the files on the stack at each."""

    def __init__(self, build_id: int) -> None:
        self.build_id = build_id
        self.moves: Counter[tuple[str, str]] = Counter()
        self.revisits: list[list[str]] = []
        self._stack: list[str] = []
        self._pushed: set[int] = set()

    def _carries(self, frame) -> bool:
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        return any(holds_build(frame.f_locals.get(name), self.build_id) for name in names)

    def profile(self, frame, event, arg) -> None:
        if event == "return" and id(frame) in self._pushed:
            self._pushed.discard(id(frame))
            self._stack.pop()
            return
        if event != "call" or not frame.f_code.co_filename.startswith(str(ROOT)):
            return
        into = str(Path(frame.f_code.co_filename).relative_to(ROOT))
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(str(ROOT)):
            caller = caller.f_back
        came_from = str(Path(caller.f_code.co_filename).relative_to(ROOT)) if caller is not None else "<celery>"
        if came_from == into or not self._carries(frame):
            return
        self.moves[(came_from, into)] += 1
        if into in self._stack and self._stack[-1] != into:
            self.revisits.append([*self._stack, into])
        self._pushed.add(id(frame))
        self._stack.append(into)


@pytest.fixture
def task_context(worker_env, monkeypatch):
    """The Celery task's context made from the test's config files, as a worker process would make it."""
    monkeypatch.setenv("DJINN_WORKER_CONFIG", str(worker_env.config))
    monkeypatch.setenv("DJINN_DRIVER_CONFIG", str(worker_env.driver_config))
    monkeypatch.setattr(context, "_current", None)
    yield
    if context._current is not None:
        context._current[1].close()


def test_a_build_walks_down_a_short_path_and_nothing_calls_back_up(worker_env, task_context):
    from djinn.tasks.build import run_build_task  # the lazy Celery app: imported with the task, not at collection

    build_id = worker_env.submit(WITH_ARTIFACT)
    walk = Walk(build_id)
    sys.setprofile(walk.profile)
    try:
        result = run_build_task(build_id)  # the task's body, in this thread
    finally:
        sys.setprofile(None)
    assert result == "passed", worker_env.status(build_id)
    assert [a["name"] for a in worker_env.status(build_id)["artifacts"]] == ["made.txt"]  # the walk reached the store

    entered = {into for _, into in walk.moves}
    unplaced = {path for path in entered if stop_of(path) not in PATH and path not in CONTROLS_AND_OBSERVERS}
    assert not unplaced, f"files the build now enters that are neither a stop nor a control: {sorted(unplaced)}"
    stops = {stop_of(path) for path in entered if stop_of(path) in PATH}
    assert stops == set(PATH), f"stops on the walk: {sorted(stops)}"
    assert len(stops) <= 7

    # Nothing re-enters a file the build is still inside (a callback up the path).
    assert walk.revisits == [], walk.revisits
    # The controls and observers are leaves: the build goes from them to no stop of the path.
    handed_on = [(a, b) for a, b in walk.moves if a in CONTROLS_AND_OBSERVERS and stop_of(b) in PATH]
    assert handed_on == [], handed_on
    # From the task the build goes to the orchestrator, and from there only forward.
    assert {b for a, b in walk.moves if a == "tasks/build.py"} == {"worker/execute.py"}
    order = list(PATH)
    backwards = [(a, b) for a, b in walk.moves if stop_of(a) in PATH and stop_of(b) in PATH and stop_of(a) != stop_of(b)
                 and order.index(stop_of(b)) < order.index(stop_of(a))]
    assert backwards == [], backwards
    print("walk:", *(f"{a} -> {b} x{n}" for (a, b), n in sorted(walk.moves.items())), sep="\n  ")
