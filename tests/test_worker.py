"""The worker daemon end to end: real PostgreSQL, real Redis, real worker processes."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from ops_support import wait_job_running
from waiting import wait_for
from worker_support import WORKER, WorkerEnv

PASSING = """
namespace: team/app
driver: {type: os}
env: ["GREETING=hello big world", "EQ=a=b"]
stages: [build, test]
jobs:
  - stage: build
    commands: ["echo \\"$GREETING|$EQ\\" > out.txt", "printf 'artifact-bytes' > art.bin"]
    artifacts: ["art.bin => result.bin"]
  - stage: test
    name: Check
    commands: ["cat out.txt"]
"""


def test_submit_runs_build_and_stores_everything(worker_env):
    worker_env.start_worker()
    build_id = worker_env.submit(PASSING, "-user", "alice", "-secret", "TOKEN=tok-123")
    info = worker_env.wait_status(build_id)
    assert info["status"] == "passed", worker_env.log_tail()
    assert info["number"] == 1
    assert [(j["stage"], j["name"], j["status"]) for j in info["jobs"]] == [
        ("setup - #1", "create-driver", "passed"),
        ("build", "build.1", "passed"),
        ("test", "check", "passed"),
    ]
    assert all(j["started_at"] and j["finished_at"] for j in info["jobs"])
    assert info["started_at"] and info["finished_at"]

    (job_output,) = worker_env.sql("SELECT output FROM build_jobs WHERE build_id = :id AND name = 'check'", id=build_id)[0]
    assert "hello big world|a=b" in job_output
    (build_output, secret, number) = worker_env.sql("SELECT output, secret, number FROM builds WHERE id = :id", id=build_id)[0]
    assert "hello big world|a=b" in build_output and "create-driver" not in build_output
    assert len(secret) == 32
    # The chunks were folded into the columns.
    assert worker_env.sql("SELECT count(*) FROM build_job_output WHERE build_id = :id", id=build_id)[0][0] == 0

    # Rows of SPEC section 2.
    assert worker_env.sql("SELECT type, config FROM build_drivers WHERE build_id = :id", id=build_id) == [("os", {"type": "os"})]
    variables = worker_env.sql("SELECT key, value, masked FROM build_variables WHERE build_id = :id ORDER BY id", id=build_id)
    assert variables[:2] == [("GREETING", "hello big world", False), ("EQ", "a=b", False)]
    assert variables[2][0] == "TOKEN" and variables[2][2] is True and variables[2][1] != "tok-123"  # encrypted at rest
    assert worker_env.sql("SELECT path FROM namespaces n JOIN builds b ON b.namespace_id = n.id WHERE b.id = :id", id=build_id) == [("team/app",)]

    # The artifact: <path>/<user_id>/<hash>, with size and digests.
    ((name, size, sha256, md5, hash_, user_id),) = worker_env.sql(
        "SELECT name, size, sha256, md5, hash, user_id FROM build_artifacts WHERE build_id = :id", id=build_id
    )
    stored = worker_env.root / "artifacts" / str(user_id) / hash_
    assert stored.read_bytes() == b"artifact-bytes"
    assert (name, size) == ("result.bin", 14)
    assert bytes(sha256) == hashlib.sha256(b"artifact-bytes").digest()
    assert bytes(md5) == hashlib.md5(b"artifact-bytes").digest()
    assert info["artifacts"] == [{"name": "result.bin", "size": 14, "sha256": hashlib.sha256(b"artifact-bytes").hexdigest()}]

    # A second build of the same user gets the next number.
    second = worker_env.submit(PASSING, "-user", "alice")
    assert worker_env.wait_status(second)["number"] == 2


def test_failing_build_and_allow_failures(worker_env):
    worker_env.start_worker()
    failing = worker_env.submit(
        "driver: {type: os}\nstages: [a, b]\njobs:\n  - {stage: a, commands: ['echo before', 'exit 4']}\n  - {stage: b, commands: ['echo never']}\n"
    )
    allowed = worker_env.submit(
        "driver: {type: os}\nstages: [a, lint]\nallow_failures: [lint]\njobs:\n  - {stage: lint, commands: ['false']}\n  - {stage: a, commands: ['true']}\n"
    )
    info = worker_env.wait_status(failing)
    assert info["status"] == "failed"
    assert [j["status"] for j in info["jobs"]] == ["passed", "failed", "failed"]
    assert all(j["finished_at"] for j in info["jobs"])
    (output,) = worker_env.sql("SELECT output FROM builds WHERE id = :id", id=failing)[0]
    assert "before" in output and "never\n" not in output.replace("echo never", "")
    info = worker_env.wait_status(allowed)
    assert info["status"] == "passed_with_failures"


SLEEPY = """
driver: {type: os}
stages: [a, b]
jobs:
  - stage: a
    commands: ["echo started", "sleep 60"]
  - stage: b
    commands: ["echo never"]
"""


def test_kill_with_secret_and_wrong_secret_ignored(worker_env, redis_server):
    import redis

    worker_env.start_worker()
    build_id = worker_env.submit(SLEEPY)
    wait_job_running(worker_env, build_id)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    assert client.publish(f"kill-{build_id}", "not-the-secret") == 1
    # The listener reads its messages in order: once it has logged a later one, it has passed over the wrong secret.
    assert client.publish("kill-after-the-wrong-secret", "") == 1
    wait_for(lambda: "channel 'kill-after-the-wrong-secret' ignored" in (worker_env.root / "worker.log").read_text(), 30,
             "the listener to read past the wrong secret")
    assert worker_env.status(build_id)["status"] == "running"

    (secret,) = worker_env.sql("SELECT secret FROM builds WHERE id = :id", id=build_id)[0]
    sent = time.monotonic()
    client.publish(f"kill-{build_id}", secret)
    # Timed with SQL rather than `status`: a CLI call alone can take seconds on a loaded machine.
    while worker_env.sql("SELECT status FROM builds WHERE id = :id", id=build_id)[0][0] == "running":
        assert time.monotonic() - sent < 10, worker_env.log_tail()
        time.sleep(0.05)
    elapsed = time.monotonic() - sent
    info = worker_env.status(build_id)
    assert info["status"] == "killed"
    assert elapsed < 2.5, f"kill took {elapsed:.2f}s"
    assert [j["status"] for j in info["jobs"]] == ["passed", "killed", "killed"]


def test_kill_command(worker_env):
    worker_env.start_worker()
    build_id = worker_env.submit(SLEEPY)
    wait_job_running(worker_env, build_id)
    res = worker_env.cli("kill", str(build_id))
    assert res.stdout == f"kill sent to build {build_id}\n"
    assert worker_env.wait_status(build_id, timeout=10)["status"] == "killed"


def test_sigusr2_writes_every_stack_and_the_build_goes_on(worker_env):
    """An operator looks into a stuck build with `kill -USR2`: stacks on standard error, nothing stops."""
    proc = worker_env.start_worker()
    build_id = worker_env.submit(SLEEPY)
    wait_job_running(worker_env, build_id)
    stacks = worker_env.stacks()
    assert stacks.count("Current thread") >= 2, stacks  # the main process and the build's pool process at least
    assert "djinn/worker/execute.py" in stacks and "celery/worker/worker.py" in stacks, stacks
    worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id, timeout=10)["status"] == "killed"
    assert proc.poll() is None


def test_timeout_gives_timed_out(worker_env):
    worker_env.write_config(timeout="2s")
    worker_env.start_worker()
    build_id = worker_env.submit(SLEEPY)
    info = worker_env.wait_status(build_id, timeout=30)
    assert info["status"] == "timed_out"
    assert [j["status"] for j in info["jobs"]] == ["passed", "timed_out", "timed_out"]


def test_same_build_enqueued_twice_runs_once(worker_env):
    from celery import Celery

    worker_env.start_worker()
    build_id = worker_env.submit(
        "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo ran >> /tmp/djinn-once-$DJINN_TEST_RUN', 'sleep 2']}\n",
        "-env", f"DJINN_TEST_RUN={worker_env.database}",
    )
    app = Celery(broker=worker_env.redis.url)
    app.send_task("djinn.run_build", args=[build_id], queue="builds_os")
    app.send_task("djinn.run_build", args=[build_id], queue="builds_os")
    info = worker_env.wait_status(build_id)
    wait_for(worker_env.broker_idle, 30, "the duplicates to be delivered and dropped")
    assert info["status"] == "passed"
    marker = Path(f"/tmp/djinn-once-{worker_env.database}")
    try:
        assert marker.read_text() == "ran\n"
    finally:
        marker.unlink(missing_ok=True)
    assert worker_env.status(build_id)["status"] == "passed"


def test_invalid_manifest_refused_and_nothing_written(worker_env):
    path = worker_env.root / "bad.yml"
    path.write_text("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: nope, commands: [x]}\n")
    res = worker_env.cli("submit", str(path), check=False)
    assert res.returncode == 2
    assert "jobs[0].stage: stage 'nope' is not declared in stages" in res.stderr
    assert "Traceback" not in res.stderr
    for table in ("builds", "build_jobs", "build_stages", "users"):
        assert worker_env.sql(f"SELECT count(*) FROM {table}")[0][0] == 0


def test_logs_follow_shows_output_while_job_runs(worker_env):
    worker_env.start_worker()
    release = worker_env.root / "release"
    # The job waits for the test (at most 60 s) rather than a fixed time: under load `logs -f` may start late.
    build_id = worker_env.submit(
        "driver: {type: os}\nstages: [a]\njobs:\n  - stage: a\n    commands: ['echo first-line',"
        " 'i=0; while [ ! -e \"$RELEASE\" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done', 'echo last-line']\n",
        "-env", f"RELEASE={release}",
    )
    proc = subprocess.Popen(
        [WORKER, "logs", "-config", str(worker_env.config), str(build_id), "-f"], stdout=subprocess.PIPE, text=True
    )
    seen_first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "first-line" and seen_first is None:
            seen_first = worker_env.status(build_id)
            release.touch()
    proc.wait(30)
    assert proc.returncode == 0
    assert seen_first is not None and seen_first["status"] == "running"
    assert "last-line\n" in lines
    # Nothing repeated or lost across the switch from chunks to the build's output column.
    text_ = "".join(lines)
    (stored,) = worker_env.sql("SELECT output FROM builds WHERE id = :id", id=build_id)[0]
    assert text_ == stored
    plain = worker_env.cli("logs", str(build_id)).stdout
    assert plain == stored


def test_celery_command_runs_a_build(worker_env):
    worker_env.start_worker(celery=True, name="celery")
    build_id = worker_env.submit("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo via celery']}\n")
    assert worker_env.wait_status(build_id)["status"] == "passed"


def test_sigkill_of_worker_group_then_another_worker_reruns(worker_env):
    marker = worker_env.root / "runs.txt"
    first = worker_env.start_worker(name="first")
    build_id = worker_env.submit(
        "driver: {type: os}\nstages: [a]\njobs:\n  - stage: a\n    commands:\n"
        f"      - test ! -e leftover  # a clean workspace on every attempt\n"
        f"      - touch leftover\n"
        f"      - echo attempt >> {marker}\n"
        f"      - sleep 3\n"
    )
    # Waiting on the marker, not on `status`: under load a CLI call can take longer than the job has left.
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, worker_env.log_tail()
        time.sleep(0.05)
    worker_env.kill_group(first)
    second = worker_env.start_worker(name="second")
    info = worker_env.wait_status(build_id, timeout=60)
    assert info["status"] == "passed", worker_env.log_tail()
    assert info["tags"] == ["orphaned"]
    assert marker.read_text() == "attempt\nattempt\n"
    (attempt, output) = worker_env.sql("SELECT attempt, output FROM builds WHERE id = :id", id=build_id)[0]
    assert attempt == 2
    assert output.count("touch leftover") == 1  # the dead attempt's output was cleared
    assert second.poll() is None


def test_build_abandoned_after_three_attempts(worker_env):
    build_id = worker_env.submit("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 30']}\n")
    for attempt in range(3):
        proc = worker_env.start_worker(name=f"w{attempt}")
        deadline = time.monotonic() + 60
        while worker_env.sql("SELECT attempt FROM builds WHERE id = :id", id=build_id)[0][0] < attempt + 1:
            assert time.monotonic() < deadline, worker_env.log_tail()
            time.sleep(0.2)
        wait_job_running(worker_env, build_id)
        worker_env.kill_group(proc)
    worker_env.start_worker(name="last")
    info = worker_env.wait_status(build_id, timeout=60)
    assert info["status"] == "failed"
    (error,) = worker_env.sql("SELECT error FROM builds WHERE id = :id", id=build_id)[0]
    assert "started 3 times" in error
    assert all(j["status"] == "failed" for j in info["jobs"])


def test_redis_restart_during_build(worker_env, redis_server):
    worker_env.start_worker()
    build_id = worker_env.submit(
        "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo one', 'sleep 4', 'echo two']}\n"
    )
    wait_job_running(worker_env, build_id)
    redis_server.restart()
    info = worker_env.wait_status(build_id, timeout=60)
    assert info["status"] == "passed", worker_env.log_tail()
    (output,) = worker_env.sql("SELECT output FROM builds WHERE id = :id", id=build_id)[0]
    assert "one\n" in output and "two\n" in output
    # The worker goes on taking builds once the broker is back.
    after = worker_env.submit("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo after']}\n")
    assert worker_env.wait_status(after, timeout=60)["status"] == "passed", worker_env.log_tail()


def test_postgres_restart_between_builds(worker_env, postgres):
    worker_env.start_worker()
    manifest = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo hi']}\n"
    assert worker_env.wait_status(worker_env.submit(manifest))["status"] == "passed"
    postgres.restart()
    assert worker_env.wait_status(worker_env.submit(manifest), timeout=60)["status"] == "passed", worker_env.log_tail()


def test_migrate_from_nothing_then_idempotent(postgres, redis_server, tmp_path):
    postgres.create_database(name := f"djinn_empty_{time.monotonic_ns()}")
    env = WorkerEnv(tmp_path, postgres, redis_server, name)
    env.write_config()
    assert "schema upgraded from nothing to " in env.cli("migrate").stdout
    assert "schema is up to date" in env.cli("migrate").stdout
    assert env.sql("SELECT count(*) FROM builds") == [(0,)]


def test_worker_refuses_to_start_without_services(worker_env, tmp_path):
    worker_env.write_config()
    text_ = worker_env.config.read_text().replace(worker_env.redis.addr, "127.0.0.1:1")
    bad = tmp_path / "bad-redis.conf"
    bad.write_text(text_)
    res = subprocess.run([WORKER, "-config", str(bad), "-driver", str(worker_env.driver_config)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "cannot connect to Redis at 127.0.0.1:1" in res.stderr
    pg_host, pg_port = worker_env.postgres.addr.split(":")
    bad.write_text(worker_env.config.read_text().replace(f'addr     "{pg_host}:{pg_port}"', 'addr     "127.0.0.1:1"'))
    res = subprocess.run([WORKER, "-config", str(bad), "-driver", str(worker_env.driver_config)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in res.stderr
    assert "Traceback" not in res.stderr


def test_objects_keys_and_masked_variables_through_the_worker(worker_env):
    import hashlib as _hashlib

    worker_env.start_worker()
    # An object owned by the user, in the object store as <path>/<user_id>/<hash>.
    ((user_id,),) = worker_env.sql(
        "INSERT INTO users (username, email, password) VALUES ('carol', 'carol@team.test', '') RETURNING id"
    )
    data = b"object payload\n"
    worker_env.sql(
        "INSERT INTO objects (user_id, author_id, hash, name, type, size, md5, sha256)"
        " VALUES (:u, :u, 'abc123', 'data.txt', 'text/plain', :n, :m, :s)",
        u=user_id, n=len(data), m=_hashlib.md5(data).digest(), s=_hashlib.sha256(data).digest(),
    )
    store = worker_env.root / "objects" / str(user_id)
    store.mkdir(parents=True)
    (store / "abc123").write_bytes(data)
    key = worker_env.root / "deploy.key"
    key.write_text("-----BEGIN TEST KEY-----\nsecret-key-material\n-----END TEST KEY-----\n")

    build_id = worker_env.submit(
        "driver: {type: os}\nobjects: ['data.txt => in/data.txt']\nstages: [a]\njobs:\n  - stage: a\n    commands:\n"
        "      - cat in/data.txt\n      - stat -c '%a' .ssh/deploy\n      - cat .ssh/deploy\n      - echo \"token=$TOKEN\"\n",
        "-user", "carol", "-key", f"deploy={key}", "-secret", "TOKEN=very-secret-token",
    )
    info = worker_env.wait_status(build_id)
    assert info["status"] == "passed", worker_env.log_tail()
    (output,) = worker_env.sql("SELECT output FROM builds WHERE id = :id", id=build_id)[0]
    assert "object payload\n" in output
    assert "\n600\n" in output
    assert "secret-key-material" not in output and "very-secret-token" not in output
    assert "token=xxxxxx" in output
    assert worker_env.sql("SELECT placed FROM build_objects WHERE build_id = :id", id=build_id) == [(True,)]
    ((stored_key,),) = worker_env.sql("SELECT key FROM build_keys WHERE build_id = :id", id=build_id)
    assert b"secret-key-material" not in bytes(stored_key)  # encrypted at rest


def test_submit_refuses_unknown_object_and_writes_nothing(worker_env):
    path = worker_env.root / "m.yml"
    path.write_text("driver: {type: os}\nobjects: [missing.bin]\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n")
    res = worker_env.cli("submit", str(path), check=False)
    assert res.returncode == 2
    assert "has no object named 'missing.bin'" in res.stderr
    assert worker_env.sql("SELECT count(*) FROM builds")[0][0] == 0


def test_submit_writes_stages_jobs_and_artifacts_in_run_order(worker_env):
    """Jobs listed out of stage order, same names in two stages, a stage named like the setup stage."""
    build_id = worker_env.submit(
        """
driver: {type: os}
stages: [one, "setup - #1", three]
jobs:
  - {stage: three, name: same, commands: ["echo 3"], artifacts: ["c.txt"]}
  - {stage: one, name: same, commands: ["echo 1a", "echo 1b"], artifacts: ["a.txt => a-out.txt"]}
  - {stage: "setup - #1", commands: ["echo 2"]}
  - {stage: one, commands: ["echo 1c"], artifacts: ["b.txt"]}
"""
    )
    stages = worker_env.sql("SELECT name FROM build_stages WHERE build_id = :id ORDER BY id", id=build_id)
    assert [s for (s,) in stages] == ["setup - #1", "one", "setup - #1", "three"]
    jobs = worker_env.sql(
        "SELECT s.name, j.name, j.commands FROM build_jobs j JOIN build_stages s ON s.id = j.stage_id"
        " WHERE j.build_id = :id ORDER BY j.id",
        id=build_id,
    )
    assert [tuple(j) for j in jobs] == [
        ("setup - #1", "create-driver", ""),
        ("one", "same", "echo 1a\necho 1b"),
        ("one", "one.1", "echo 1c"),
        ("setup - #1", "setup-1.1", "echo 2"),
        ("three", "same", "echo 3"),
    ]
    artifacts = worker_env.sql(
        "SELECT s.name, j.commands, a.source, a.name FROM build_artifacts a JOIN build_jobs j ON j.id = a.job_id"
        " JOIN build_stages s ON s.id = j.stage_id WHERE a.build_id = :id ORDER BY a.id",
        id=build_id,
    )
    assert [tuple(a) for a in artifacts] == [
        ("one", "echo 1a\necho 1b", "a.txt", "a-out.txt"),
        ("one", "echo 1c", "b.txt", "b.txt"),
        ("three", "echo 3", "c.txt", "c.txt"),
    ]
    (setup_stage,) = worker_env.sql(
        "SELECT s.id FROM build_stages s JOIN build_jobs j ON j.stage_id = s.id WHERE j.name = 'create-driver' AND j.build_id = :id",
        id=build_id,
    )
    assert setup_stage[0] == min(s for (s,) in worker_env.sql("SELECT id FROM build_stages WHERE build_id = :id", id=build_id))
