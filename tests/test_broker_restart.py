"""A Redis restart while a build runs must not stop the worker (the reason for the celery pin in setup.cfg).

With the pinned Celery this passes. scripts/check-celery-upgrade VERSION runs this
test with a newer Celery in a scratch venv: with 5.7.0 the worker stops with
"Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")".
"""

from __future__ import annotations

import time

LONG = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo one', 'sleep 10', 'echo two']}\n"
QUICK = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo after']}\n"


def test_worker_survives_a_redis_restart_with_a_build_unacknowledged(worker_env, redis_server):
    worker = worker_env.start_worker()
    build_id = worker_env.submit(LONG)
    deadline = time.monotonic() + 60
    # Straight from the database: the job is running, so its message is delivered and not yet acknowledged.
    while worker_env.sql("SELECT count(*) FROM build_jobs WHERE build_id = :id AND name = 'a.1' AND status = 'running'",
                         id=build_id)[0][0] == 0:
        assert time.monotonic() < deadline, worker_env.log_tail()
        time.sleep(0.1)
    redis_server.restart()
    info = worker_env.wait_status(build_id, timeout=90)
    assert info["status"] == "passed", worker_env.log_tail()
    after = worker_env.submit(QUICK)
    assert worker_env.wait_status(after, timeout=90)["status"] == "passed", worker_env.log_tail()
    assert worker.poll() is None
    log = (worker_env.root / "worker.log").read_text()
    assert "Unrecoverable error" not in log, worker_env.log_tail()
