"""Stopping real worker processes: drain on the first signal, hand back on the second.

Signals go to the worker's main process only, the way systemd (KillMode=mixed)
and start-stop-daemon send them.
"""

from __future__ import annotations

import signal
import time

import pytest
from ops_support import main_signal, processes_with, wait_exit, wait_for, wait_job_running

DRAINS = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ["echo started", "sleep 3", "echo finished"]
"""

# Runs long the first time, quickly when rerun: $MARK counts the runs.
LONG_FIRST_TIME = """
driver: {type: os}
stages: [a, b]
jobs:
  - stage: a
    commands:
      - test ! -e leftover  # every run starts from a clean workspace
      - touch leftover
      - echo run >> "$MARK"
      - if [ "$(wc -l < "$MARK")" -lt 2 ]; then sleep 47.25; fi
  - stage: b
    commands: ["echo second stage"]
"""

QUICK = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo quick']}\n"


def _logged(env, text: str) -> bool:
    path = env.root / "worker.log"
    return path.exists() and text in path.read_text(errors="replace")


def _running_rows(env) -> list:
    return env.sql(
        "SELECT 'build', id FROM builds WHERE status = 'running' "
        "UNION ALL SELECT 'job', id FROM build_jobs WHERE status = 'running'"
    )


def test_first_signal_lets_running_build_finish_and_takes_no_new_one(worker_env):
    proc = worker_env.start_worker(name="draining")
    running = worker_env.submit(DRAINS)
    wait_job_running(worker_env, running)
    main_signal(proc, signal.SIGTERM)
    wait_for(lambda: _logged(worker_env, "graceful shutdown"), 10, "the drain to start")
    later = worker_env.submit(QUICK)  # a slot is free: a worker still taking builds would run it

    assert wait_exit(proc, 30, worker_env) == 0
    info = worker_env.status(running)
    assert info["status"] == "passed", worker_env.log_tail()
    assert [j["status"] for j in info["jobs"]] == ["passed", "passed"]
    (output,) = worker_env.sql("SELECT output FROM builds WHERE id = :id", id=running)[0]
    assert "finished\n" in output
    assert worker_env.status(later)["status"] == "queued"
    assert _running_rows(worker_env) == []

    worker_env.start_worker(name="next")
    assert worker_env.wait_status(later)["status"] == "passed"


@pytest.mark.parametrize(
    "first, second",
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
    ids=["term-term", "int-int", "int-term"],
)
def test_second_signal_hands_running_builds_back(worker_env, first, second):
    proc = worker_env.start_worker(name="first")
    marks = {}
    for n in range(2):  # parallelism 2: both run at once
        mark = worker_env.root / f"runs-{n}.txt"
        marks[worker_env.submit(LONG_FIRST_TIME, "-env", f"MARK={mark}")] = mark
    for build_id in marks:
        wait_job_running(worker_env, build_id)

    (signalled_at,) = worker_env.sql("SELECT now()")[0]
    main_signal(proc, first)
    wait_for(lambda: _logged(worker_env, "graceful shutdown"), 10, "the drain to start")
    # The draining worker still runs both builds: each beats its lease after the signal.
    beats = "SELECT count(*) FROM builds WHERE id = ANY(:ids) AND heartbeat_at > :t"
    wait_for(lambda: worker_env.sql(beats, ids=list(marks), t=signalled_at) == [(2,)], 10, "a heartbeat from each build")
    assert proc.poll() is None
    assert all(worker_env.status(b)["status"] == "running" for b in marks)

    sent = time.monotonic()
    main_signal(proc, second)
    assert wait_exit(proc, 30, worker_env) == 0, worker_env.log_tail()
    stopped_in = time.monotonic() - sent

    # Nothing left running: builds and jobs are back to queued, as submitted.
    assert _running_rows(worker_env) == []
    assert processes_with("sleep 47.25") == []  # the drivers were torn down
    for build_id in marks:
        info = worker_env.status(build_id)
        assert info["status"] == "queued", worker_env.log_tail()
        assert {j["status"] for j in info["jobs"]} == {"queued"}
        assert info["started_at"] is None and info["tags"] == []
        (attempt, worker, output) = worker_env.sql("SELECT attempt, worker, output FROM builds WHERE id = :id", id=build_id)[0]
        assert (attempt, worker, output) == (0, None, None)  # a hand-back is not counted as a crash
        assert worker_env.sql("SELECT count(*) FROM build_job_output WHERE build_id = :id", id=build_id)[0][0] == 0
    assert "handed back" in worker_env.log_tail(200)

    # Another worker reruns them from a clean state.
    worker_env.start_worker(name="second")
    for build_id, mark in marks.items():
        info = worker_env.wait_status(build_id, timeout=60)
        assert info["status"] == "passed", worker_env.log_tail()
        assert info["tags"] == []
        assert mark.read_text() == "run\nrun\n"
        (attempt, output) = worker_env.sql("SELECT attempt, output FROM builds WHERE id = :id", id=build_id)[0]
        assert attempt == 1
        assert output.count("touch leftover") == 1 and "second stage" in output
    print(f"first worker stopped {stopped_in:.2f}s after the second signal")


def test_sigquit_cold_shutdown_hands_back_too(worker_env):
    """Celery's own cold shutdown ends pool processes with SIGTERM: their builds are handed back."""
    proc = worker_env.start_worker(name="first")
    mark = worker_env.root / "runs.txt"
    build_id = worker_env.submit(LONG_FIRST_TIME, "-env", f"MARK={mark}")
    wait_job_running(worker_env, build_id)
    main_signal(proc, signal.SIGQUIT)
    wait_exit(proc, 30, worker_env)
    assert _running_rows(worker_env) == []
    assert worker_env.status(build_id)["status"] == "queued", worker_env.log_tail()
    worker_env.start_worker(name="second")
    info = worker_env.wait_status(build_id, timeout=60)
    assert info["status"] == "passed"
    assert mark.read_text() == "run\nrun\n"


def test_kill_during_drain_is_a_kill_not_a_hand_back(worker_env):
    proc = worker_env.start_worker(name="first")
    build_id = worker_env.submit(LONG_FIRST_TIME, "-env", f"MARK={worker_env.root / 'runs.txt'}")
    wait_job_running(worker_env, build_id)
    main_signal(proc, signal.SIGTERM)
    wait_for(lambda: _logged(worker_env, "graceful shutdown"), 10, "the drain to start")
    sent = worker_env.cli("kill", str(build_id)).stdout
    assert sent.strip() == f"kill sent to build {build_id}", sent  # the draining worker's pool process heard it
    assert wait_exit(proc, 30, worker_env) == 0
    info = worker_env.status(build_id)
    assert info["status"] == "killed"
    assert _running_rows(worker_env) == []


def test_idle_worker_stops_at_once(worker_env):
    proc = worker_env.start_worker(name="idle")
    sent = time.monotonic()
    main_signal(proc, signal.SIGTERM)
    assert wait_exit(proc, 15, worker_env) == 0
    print(f"idle worker stopped in {time.monotonic() - sent:.2f}s")


def test_sighup_reopens_the_log_and_keeps_the_worker(worker_env):
    proc = worker_env.start_worker(name="hup")
    first = worker_env.submit(QUICK)
    assert worker_env.wait_status(first)["status"] == "passed"
    log = worker_env.root / "worker.log"
    rotated = worker_env.root / "worker.log.1"
    log.rename(rotated)
    main_signal(proc, signal.SIGHUP)
    wait_for(lambda: log.exists() and "log file reopened" in log.read_text(), 10, "the log to be reopened")
    before = rotated.read_text()

    second = worker_env.submit(QUICK)
    assert worker_env.wait_status(second)["status"] == "passed"
    assert proc.poll() is None  # not restarted, not stopped: Celery's SIGHUP re-exec is replaced
    wait_for(lambda: f"build {second}: passed" in log.read_text(), 10, "the pool process to log to the new file")
    text = log.read_text()
    assert f"build={second} " in text and "process=ForkPoolWorker" in text
    assert "received" not in text  # Celery's line per task is left to the debug level
    assert "log file reopened" in text  # the main process writes there too
    assert rotated.read_text() == before  # nothing more went to the rotated file


def test_docker_build_handed_back_leaves_no_container_or_volume(worker_env, docker_api):
    from docker_support import IMAGE, NOTHING, labelled

    worker_env.write_config(extra='driver "docker"')
    worker_env.driver_config.write_text("driver docker {}\n")
    proc = worker_env.start_worker(name="docker-first")
    manifest = (
        f"driver: {{type: docker, image: '{IMAGE}', workspace: /workspace}}\n"
        "stages: [a]\njobs:\n  - {stage: a, commands: ['echo in a container', 'sleep 47.25']}\n"
    )
    build_id = worker_env.submit(manifest)
    wait_job_running(worker_env, build_id, timeout=60)
    # The job's row says running as the job starts; its container may be a moment behind on a busy engine.
    wait_for(lambda: labelled(docker_api, build=str(build_id))["containers"], 60, "the job's container")

    main_signal(proc, signal.SIGTERM)
    wait_for(lambda: _logged(worker_env, "graceful shutdown"), 10, "the drain to start")
    main_signal(proc, signal.SIGTERM)
    assert wait_exit(proc, 60, worker_env) == 0, worker_env.log_tail()
    assert labelled(docker_api, build=str(build_id)) == NOTHING
    assert worker_env.status(build_id)["status"] == "queued"
    assert _running_rows(worker_env) == []
    (attempt,) = worker_env.sql("SELECT attempt FROM builds WHERE id = :id", id=build_id)[0]
    assert attempt == 0


def test_celery_command_has_the_same_two_signals(worker_env):
    """`celery -A djinn worker` gets the same shutdown: Celery alone would ignore a second SIGTERM."""
    proc = worker_env.start_worker(celery=True, name="celery")
    mark = worker_env.root / "runs.txt"
    build_id = worker_env.submit(LONG_FIRST_TIME, "-env", f"MARK={mark}")
    wait_job_running(worker_env, build_id)
    main_signal(proc, signal.SIGTERM)
    wait_for(lambda: _logged(worker_env, "graceful shutdown"), 10, "the drain to start")
    main_signal(proc, signal.SIGTERM)
    assert wait_exit(proc, 30, worker_env) == 0
    assert worker_env.status(build_id)["status"] == "queued"
    assert _running_rows(worker_env) == []
