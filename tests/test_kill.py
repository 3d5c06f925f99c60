"""Killing builds (issue 12 item 6): queued builds are settled in the database, only canonical channels count."""

from __future__ import annotations

import threading
import time

import redis
from ops_support import wait_job_running

from djinn.config import RedisSettings
from djinn.worker.kill import _Hub, channel_build_id

SLEEPY = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo started', 'sleep 60']}\n"
QUICK = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo quick']}\n"


def wait_log(env, text: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = env.root / "worker.log"
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged {count} time(s); log:\n{env.log_tail()}")


def test_only_canonical_kill_channels_name_a_build():
    assert channel_build_id(b"kill-7") == 7
    assert channel_build_id("kill-1234567890123") == 1234567890123
    for channel in (b"kill-007", b"kill- 7", b"kill-7x", b"kill-+7", b"kill--7", b"kill-", b"kill-7 ", "kill-\u0663".encode(), b"kills-7"):
        assert channel_build_id(channel) is None, channel


def test_queued_build_killed_never_runs_and_is_mailed_once(worker_env, smtp_servers):
    smtp = smtp_servers()
    worker_env.write_config(extra=smtp.config())
    # No worker runs: the build waits in the queue.
    build_id = worker_env.submit(SLEEPY, "-user", "alice", "-email", "alice@team.test")
    res = worker_env.cli("kill", str(build_id))
    assert "marked killed" in res.stdout
    info = worker_env.status(build_id)
    assert info["status"] == "killed" and info["finished_at"] is not None and info["started_at"] is None
    assert [(j["name"], j["status"]) for j in info["jobs"]] == [("create-driver", "killed"), ("a.1", "killed")]
    assert all(j["finished_at"] is not None and j["started_at"] is None for j in info["jobs"])
    # Killing it again says it is over.
    again = worker_env.cli("kill", str(build_id), check=False)
    assert again.returncode == 1 and "already killed" in again.stderr

    worker_env.start_worker()
    # A build queued after it runs: the worker has been through the killed build's message by then.
    later = worker_env.submit(QUICK, "-user", "alice", "-email", "alice@team.test")
    assert worker_env.wait_status(later)["status"] == "passed"
    info = worker_env.status(build_id)
    assert info["status"] == "killed"
    assert all(j["status"] == "killed" and j["started_at"] is None for j in info["jobs"])
    (output, attempt) = worker_env.sql("SELECT output, attempt FROM builds WHERE id = :id", id=build_id)[0]
    assert output is None and attempt == 0  # never claimed, never ran

    (received,) = smtp.wait(1)
    assert received.message["Subject"] == "Djinn CI - Build #1 killed"
    assert received.rcpt_tos == ["alice@team.test"]
    deadline = time.monotonic() + 30
    while worker_env.sql("SELECT state FROM build_notifications WHERE build_id = :id AND kind = 'mail'", id=build_id) != [("sent",)]:
        assert time.monotonic() < deadline, worker_env.log_tail()
        time.sleep(0.2)
    # Re-sent mail tasks and the sweep find it sent: still one mail.
    from celery import Celery

    app = Celery(broker=worker_env.redis.url)
    app.send_task("djinn.send_failure_mail", args=[build_id], queue="builds_os")
    wait_log(worker_env, f"build {build_id}: failure mail: nothing to do: already sent")
    assert len(smtp.messages) == 1


def test_non_canonical_kill_channels_are_ignored(worker_env, redis_server):
    worker_env.start_worker()
    build_id = worker_env.submit(SLEEPY)
    wait_job_running(worker_env, build_id)
    (secret,) = worker_env.sql("SELECT secret FROM builds WHERE id = :id", id=build_id)[0]
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    channels = [f"kill-0{build_id}", f"kill- {build_id}", f"kill-{build_id}x"]
    for channel in channels:
        assert client.publish(channel, secret) == 1  # the worker hears it...
    wait_log(worker_env, "not kill-<build id>", count=len(channels))
    assert worker_env.status(build_id)["status"] == "running"  # ...and ignores it
    client.publish(f"kill-{build_id}", secret)
    assert worker_env.wait_status(build_id, timeout=20)["status"] == "killed"


def test_kill_heard_before_the_watch_starts_is_not_lost(redis_server):
    """A kill published between a build's claim and the start of its watch still kills it."""
    hub = _Hub(RedisSettings(addr=redis_server.addr))
    assert hub.subscribed.wait(10)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.publish("kill-41", "other-secret")
    client.publish("kill-42", "s3cret")
    client.publish("kill-42", "junk sent after it")  # does not push the real one out
    deadline = time.monotonic() + 10
    while len(hub.early.get(42, [])) < 2:
        assert time.monotonic() < deadline, "the hub did not hear the kill"
        time.sleep(0.02)
    killed = threading.Event()
    wrong = threading.Event()
    hub.watch(41, b"the-real-secret", wrong.set)  # a payload that is not the secret does not kill
    hub.watch(42, b"s3cret", killed.set)
    assert killed.wait(5)
    assert not wrong.wait(0.5)
    hub.unwatch(41)
    hub.unwatch(42)
