"""The Djinn server's curlyq queue (issue 11, item 2): wire formats against Go's bytes, the consumer
protocol on a real Redis, and real worker processes taking the server's jobs beside Celery.

tests/fixtures/curlyq/payloads.json was printed by tests/fixtures/curlyq/gen (Go's
encoding/gob and vmihailenco/msgpack v4.0.4 / v4.3.12).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import redis
from sqlalchemy import create_engine
from waiting import wait_for

from djinn.worker.curlyq import (
    Consumer,
    DeadJob,
    Job,
    MalformedJob,
    QueueKeys,
    now_score,
    push_build,
    push_job,
)
from djinn.worker.gob import GobError, Payload, decode_payload, encode_payload

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "curlyq" / "payloads.json").read_text())
QUEUE = "builds_os"




# -- wire formats ----------------------------------------------------------------------


@pytest.mark.parametrize("case", FIXTURES, ids=[c["name"] for c in FIXTURES])
def test_gob_payload_is_byte_exact_to_go(case):
    go = bytes.fromhex(case["gob"])
    assert encode_payload(case["host"], case["build_id"]) == go
    assert decode_payload(go) == Payload(case["host"], case["build_id"])


@pytest.mark.parametrize("case", FIXTURES, ids=[c["name"] for c in FIXTURES])
def test_job_is_byte_exact_to_msgpack_v4(case):
    job = Job(case["job_id"], bytes.fromhex(case["gob"]), case["attempt"])
    assert job.pack() == bytes.fromhex(case["job_v4_0_4"]) == bytes.fromhex(case["job_v4_3_12"])
    assert Job.unpack(bytes.fromhex(case["job_v4_0_4"])) == job


def test_fixtures_cover_the_encodings_that_differ():
    """The fixture set exercises every length and width boundary the encoders switch at."""
    jobs = [bytes.fromhex(c["job_v4_0_4"]) for c in FIXTURES]
    data_headers = {j[j.index(b"Data") + 4] for j in jobs}
    assert {0xC4, 0xC5} <= data_headers  # bin8 and bin16
    gobs = [bytes.fromhex(c["gob"]) for c in FIXTURES]
    assert any(len(g) > 0x2B + 130 for g in gobs)  # a value message longer than 127 bytes: 2-byte length
    assert {c["build_id"] for c in FIXTURES} >= {0, -1, 2**63 - 1, -(2**63)}


def test_job_decoder_reads_other_msgpack_spellings():
    """Compact integers, str instead of bin, arrays (StructAsArray), extra fields: all read as Go would."""
    data = bytes.fromhex(FIXTURES[0]["gob"])
    compact = msgpack.packb({"ID": "j1", "Data": data, "Attempt": 3, "Extra": [1, 2]}, use_bin_type=True)
    assert Job.unpack(compact) == Job("j1", data, 3)
    as_str = msgpack.packb({"ID": "j2", "Data": "hello", "Attempt": 0}, use_bin_type=False)
    assert Job.unpack(as_str) == Job("j2", b"hello", 0)
    as_array = msgpack.packb(["j3", data, 1], use_bin_type=True)
    assert Job.unpack(as_array) == Job("j3", data, 1)
    assert Job.unpack(msgpack.packb({"ID": "j4"})) == Job("j4", b"", 0)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"not msgpack at all", msgpack.packb(17), msgpack.packb({"ID": 5, "Data": b"", "Attempt": 0}),
     msgpack.packb({"ID": "x", "Data": b"", "Attempt": "one"}), msgpack.packb({"ID": b"\xff\xfe", "Data": b""})],
)
def test_job_decoder_refuses_what_is_not_a_job(raw):
    with pytest.raises(MalformedJob):
        Job.unpack(raw)


def test_decoders_never_fail_other_than_cleanly():
    """Every truncation and many random corruptions of Go's bytes: a Payload/Job or our own error, nothing else."""
    rng = random.Random(11)
    for case in FIXTURES:
        go = bytes.fromhex(case["gob"])
        for cut in range(len(go)):
            with pytest.raises(GobError):
                decode_payload(go[:cut])
        job = bytes.fromhex(case["job_v4_0_4"])
        for cut in range(len(job)):
            with pytest.raises(MalformedJob):
                Job.unpack(job[:cut])
        for _ in range(200):
            bad = bytearray(go)
            bad[rng.randrange(len(bad))] = rng.randrange(256)
            try:
                assert isinstance(decode_payload(bytes(bad)), Payload)
            except GobError:
                pass


def test_gob_decoder_ignores_trailing_bytes_as_go_does():
    go = bytes.fromhex(FIXTURES[0]["gob"])
    assert decode_payload(go + b"\x07garbage") == Payload(FIXTURES[0]["host"], FIXTURES[0]["build_id"])


# -- the protocol on a real Redis ----------------------------------------------------


@pytest.fixture
def client(redis_server):
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    c = redis.Redis.from_url(redis_server.url, socket_timeout=10, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    yield c
    c.close()


class Recorder:
    """A handler that keeps the jobs it saw; `fail` maps a job id to the exception to raise for it."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.lock = threading.Lock()

    def __call__(self, job: Job) -> None:
        with self.lock:
            self.jobs.append(job)
            errors = self.fail.get(job.id)
            if errors:
                raise errors.pop(0)

    def ids(self) -> list[str]:
        with self.lock:
            return [j.id for j in self.jobs]


@pytest.fixture
def consumers(client):
    made: list[Consumer] = []

    def make(handler, **kwargs) -> Consumer:
        kwargs.setdefault("max_backoff", 1.0)
        consumer = Consumer(client, QUEUE, handler, **kwargs)
        made.append(consumer)
        return consumer.start()

    yield make
    for consumer in made:
        consumer.stop()


def go_push_v040(client: redis.Redis, queue: str, job: Job) -> None:
    """What curlyq v0.4.0's producer (linked by the Djinn server) does: data and active, no signal."""
    keys = QueueKeys(queue)
    assert client.hsetnx(keys.data, job.id, job.pack()) == 1
    client.rpush(keys.active, job.id)


def test_push_build_writes_what_the_server_writes(client):
    job_id = push_build(client, QUEUE, 42, "https://djinn-ci.com")
    keys = QueueKeys(QUEUE)
    stored = client.hget(keys.data, job_id)
    assert stored == Job(job_id, encode_payload("https://djinn-ci.com", 42), 0).pack()
    assert Job.unpack(stored).id == job_id and str(uuid.UUID(job_id)) == job_id
    assert client.lrange(keys.active, 0, -1) == [job_id.encode()]
    assert client.lrange(keys.signal, 0, -1) == [b"1"]
    assert push_job(client, QUEUE, Job.unpack(stored)) is False  # the same id is not queued twice
    assert client.llen(keys.active) == 1


def test_consumer_takes_acks_and_heartbeats(client, consumers):
    recorder = Recorder()
    pushed = [push_build(client, QUEUE, n, "https://h") for n in (1, 2)]
    go_job = Job(str(uuid.uuid4()), encode_payload("https://h", 3))
    go_push_v040(client, QUEUE, go_job)  # no signal: found by polling
    consumer = consumers(recorder)
    wait_for(lambda: len(recorder.jobs) == 3, timeout=60, what="three jobs handled")
    assert recorder.ids() == [*pushed, go_job.id]  # in queue order
    assert [decode_payload(j.data).build_id for j in recorder.jobs] == [1, 2, 3]
    keys = QueueKeys(QUEUE)
    wait_for(lambda: client.hlen(keys.data) == 0, timeout=60, what="data hash emptied")
    assert client.llen(keys.active) == 0
    assert client.scard(consumer.member) == 0
    score = client.zscore(keys.consumers, consumer.member)
    assert score is not None and abs(score - time.time()) < 30 and score == int(score)
    assert consumer.member == f"{QUEUE}:inflight:{consumer.id}"


def test_broken_jobs_go_to_the_dead_set_and_the_consumer_keeps_going(client, consumers):
    keys = QueueKeys(QUEUE)
    recorder = Recorder()
    # Not msgpack; msgpack but not a gob payload (the handler says dead); an id with no data.
    client.hset(keys.data, "garbage", b"\x93\x01")
    client.hset(keys.data, "bad-gob", Job("bad-gob", b"\x00\x01", 2).pack())
    client.rpush(keys.active, "garbage", "bad-gob", "no-data")
    recorder.fail["bad-gob"] = [DeadJob("not a payload")]
    good = push_build(client, QUEUE, 5, "")
    consumers(recorder)
    wait_for(lambda: good in recorder.ids(), timeout=60, what="the good job handled")
    wait_for(lambda: client.zcard(keys.dead) == 3, timeout=60, what="three dead jobs")
    dead = dict(client.zrange(keys.dead, 0, -1, withscores=True))
    assert set(dead) == {b"garbage", b"bad-gob", b"no-data"}
    assert all(abs(score - time.time()) < 60 for score in dead.values())
    assert client.hget(keys.data, "garbage") == b"\x93\x01"  # kept as it was, for a look
    assert Job.unpack(client.hget(keys.data, "bad-gob")) == Job("bad-gob", b"\x00\x01", 3)  # Attempt counted
    assert not client.hexists(keys.data, good)
    assert recorder.ids() == ["bad-gob", good]


def test_stale_consumers_jobs_are_reenqueued_live_ones_left_alone(client, consumers):
    """A Go consumer two minutes silent is dead; one that beat 100 s ago (Go beats every 60 s) is alive."""
    keys = QueueKeys(QUEUE)
    dead_member, slow_member, live_member = (keys.inflight(str(uuid.uuid4())) for _ in range(3))
    orphan = Job(str(uuid.uuid4()), encode_payload("https://h", 7), 1)
    slow_job = Job(str(uuid.uuid4()), encode_payload("https://h", 8))
    live_job = Job(str(uuid.uuid4()), encode_payload("https://h", 9))
    for member, job, age in ((dead_member, orphan, 3600), (slow_member, slow_job, 100), (live_member, live_job, 0)):
        client.zadd(keys.consumers, {member: now_score() - age})
        client.sadd(member, job.id)
        client.hset(keys.data, job.id, job.pack())
    recorder = Recorder()
    consumer = consumers(recorder)
    wait_for(lambda: recorder.jobs, timeout=60, what="the orphaned job handled")
    assert recorder.jobs == [orphan]  # Attempt unchanged by the re-enqueue
    wait_for(lambda: not client.hexists(keys.data, orphan.id), timeout=60, what="the orphan acknowledged")
    assert client.zscore(keys.consumers, dead_member) is None and not client.exists(dead_member)
    for member, job in ((slow_member, slow_job), (live_member, live_job)):
        assert client.zscore(keys.consumers, member) is not None
        assert client.smembers(member) == {job.id.encode()}
        assert client.hexists(keys.data, job.id)
    polls = consumer.polls
    wait_for(lambda: consumer.polls >= polls + 2, timeout=60, what="two more poll rounds")  # nothing else is taken
    assert recorder.jobs == [orphan] and client.llen(keys.active) == 0
    assert consumer.reap() == 0


def test_failed_hand_over_is_retried_via_the_scheduled_set(client, consumers):
    keys = QueueKeys(QUEUE)
    recorder = Recorder()
    job_id = push_build(client, QUEUE, 11, "")
    recorder.fail[job_id] = [RuntimeError("broker away")]
    consumers(recorder, scheduler_interval=0.2)
    wait_for(lambda: len(recorder.jobs) == 2, timeout=30, what="the retry")
    assert [j.attempt for j in recorder.jobs] == [0, 1]
    wait_for(lambda: not client.hexists(keys.data, job_id), timeout=60, what="the retry acknowledged")
    assert client.zcard(keys.scheduled) == 0 and client.zcard(keys.dead) == 0


def test_scheduled_jobs_left_by_go_workers_are_run_when_due(client, consumers):
    keys = QueueKeys(QUEUE)
    due, later = Job("due", encode_payload("", 1), 1), Job("later", encode_payload("", 2), 1)
    for job, at in ((due, now_score() - 5), (later, now_score() + 3600)):
        client.hset(keys.data, job.id, job.pack())
        client.zadd(keys.scheduled, {job.id: at})
    recorder = Recorder()
    consumers(recorder, scheduler_interval=0.2)
    wait_for(lambda: recorder.jobs, timeout=60, what="the due job")
    assert recorder.jobs == [due]
    assert client.zrange(keys.scheduled, 0, -1) == [b"later"]


def test_stop_leaves_the_consumers_set(client, consumers):
    consumer = consumers(Recorder())
    keys = QueueKeys(QUEUE)
    wait_for(lambda: client.zscore(keys.consumers, consumer.member) is not None, timeout=60, what="registration")
    consumer.stop()
    assert not consumer.running
    assert client.zscore(keys.consumers, consumer.member) is None


def test_consumer_survives_redis_going_away(redis_server, client, consumers, caplog):
    caplog.set_level(logging.WARNING, logger="djinn.worker.curlyq")
    recorder = Recorder()
    consumer = consumers(recorder, heartbeat_interval=0.5)
    first = push_build(client, QUEUE, 1, "")
    wait_for(lambda: recorder.ids() == [first], timeout=60, what="the first job")
    redis_server.stop()
    wait_for(lambda: sum("failed" in r.getMessage() for r in caplog.records) >= 2, timeout=60,
             what="Redis failures logged, and tried again")
    redis_server.start()  # empty: the consumer must register again before taking jobs
    assert consumer.running
    second = wait_for(lambda: _try_push(client), timeout=60, what="Redis back")
    wait_for(lambda: second in recorder.ids(), timeout=60, what="the job pushed after the restart")
    wait_for(lambda: client.zscore(QueueKeys(QUEUE).consumers, consumer.member) is not None, timeout=60, what="re-registration")


def _try_push(client):
    try:
        return push_build(client, QUEUE, 2, "")
    except redis.RedisError:
        return None


# -- real worker processes ---------------------------------------------------------------

PASSING = """
driver: {type: os}
stages: [build]
jobs:
  - stage: build
    commands:
      - echo "ran-$((6 * 7))-once"
"""

FAILING = """
driver: {type: os}
stages: [build]
jobs:
  - stage: build
    commands:
      - echo "about to fail"
      - exit 3
"""


def server_submit(env, manifest: str, *, host: str = "https://djinn.example.org", username: str = "alice",
                  email: str | None = None, push: bool = True) -> tuple[int, str | None]:
    """Write a build's rows, then queue it as the Djinn server does (curlyq v0.4.0 producer, gob payload)."""
    from djinn.db.engine import sessions
    from djinn.db.submit import submit

    client = redis.Redis.from_url(env.redis.url)
    pushed: list[str] = []

    def enqueue(build_id: int, queue: str) -> None:
        if push:
            job = Job(str(uuid.uuid4()), encode_payload(host, build_id))
            go_push_v040(client, queue, job)
            pushed.append(job.id)

    engine = create_engine(env.url)
    try:
        submitted = submit(sessions(engine), manifest, username=username, email=email, enqueue=enqueue)
    finally:
        engine.dispose()
        client.close()
    return submitted.id, (pushed[0] if pushed else None)


def acknowledged(client: redis.Redis, job_id: str) -> bool:
    keys = QueueKeys(QUEUE)
    if client.hexists(keys.data, job_id):
        return False
    members = client.zrange(keys.consumers, 0, -1)
    return not any(client.sismember(m, job_id) for m in members)


def test_worker_runs_server_jobs_once_and_dead_letters_broken_ones(worker_env):
    client = redis.Redis.from_url(worker_env.redis.url)
    keys = QueueKeys(QUEUE)
    # Broken jobs first: the worker must get past them.
    client.hset(keys.data, "not-msgpack", b"\xc1\xc1")
    client.hset(keys.data, "not-gob", Job("not-gob", b"\x00junk").pack())
    client.hset(keys.data, "no-build", Job("no-build", encode_payload("https://h", 999999)).pack())
    client.rpush(keys.active, "not-msgpack", "not-gob", "no-build")
    build_id, job_id = server_submit(worker_env, PASSING)
    worker_env.start_worker()
    assert worker_env.wait_status(build_id)["status"] == "passed"
    wait_for(lambda: acknowledged(client, job_id), timeout=60, what="the job acknowledged")
    wait_for(lambda: client.zcard(keys.dead) == 3, timeout=60, what="three dead jobs")
    assert {m for m in client.zrange(keys.dead, 0, -1)} == {b"not-msgpack", b"not-gob", b"no-build"}
    ((attempt, started),) = worker_env.sql("SELECT attempt, started_at FROM builds WHERE id = :id", id=build_id)
    assert attempt == 1
    output = worker_env.sql("SELECT output FROM build_jobs WHERE build_id = :id", id=build_id)
    # Once as the shell's trace ("+ echo ran-42-once"), once as the command's output.
    lines = [line.strip() for (o,) in output for line in (o or "").splitlines()]
    assert lines.count("ran-42-once") == 1, lines
    # The same build queued again (a job re-enqueued after its worker died between
    # hand-over and ack): acknowledged, not run again.
    again = Job(str(uuid.uuid4()), encode_payload("https://h", build_id))
    go_push_v040(client, QUEUE, again)
    wait_for(lambda: acknowledged(client, again.id), timeout=60, what="the repeated job acknowledged")
    wait_for(worker_env.broker_idle, 30, "the task it was handed to, if any, to be over")
    assert worker_env.sql("SELECT attempt, started_at FROM builds WHERE id = :id", id=build_id) == [(attempt, started)]
    # Celery's own queue still works beside it.
    celery_build = worker_env.submit(PASSING)
    assert worker_env.wait_status(celery_build)["status"] == "passed"
    assert "curlyq builds_os: job not-gob moved to the dead set" in (worker_env.root / "worker.log").read_text()
    client.close()


def test_worker_takes_over_a_dead_go_workers_job_and_leaves_a_live_ones(worker_env):
    client = redis.Redis.from_url(worker_env.redis.url)
    keys = QueueKeys(QUEUE)
    orphaned_build, _ = server_submit(worker_env, PASSING, push=False)
    live_build, _ = server_submit(worker_env, PASSING, push=False)
    dead_member, live_member = keys.inflight(str(uuid.uuid4())), keys.inflight(str(uuid.uuid4()))
    orphan = Job(str(uuid.uuid4()), encode_payload("https://h", orphaned_build))
    held = Job(str(uuid.uuid4()), encode_payload("https://h", live_build))
    for member, job, age in ((dead_member, orphan, 600), (live_member, held, 5)):
        client.zadd(keys.consumers, {member: now_score() - age})
        client.sadd(member, job.id)
        client.hset(keys.data, job.id, job.pack())
    worker_env.start_worker()
    assert worker_env.wait_status(orphaned_build)["status"] == "passed"
    wait_for(lambda: acknowledged(client, orphan.id), timeout=60, what="the orphan acknowledged")
    assert client.zscore(keys.consumers, dead_member) is None
    assert worker_env.sql("SELECT attempt FROM builds WHERE id = :id", id=orphaned_build) == [(1,)]
    # Had the live consumer's job been taken too, it would be handed over and run by now.
    def settled() -> bool:
        held_elsewhere = any(client.scard(k) for k in client.scan_iter(f"{QUEUE}:inflight:*") if k.decode() != live_member)
        return worker_env.broker_idle() and not client.llen(keys.active) and not held_elsewhere

    wait_for(settled, timeout=60, what="the worker's queues empty")
    assert worker_env.status(live_build)["status"] == "queued"
    assert client.smembers(live_member) == {held.id.encode()}
    assert client.zscore(keys.consumers, live_member) is not None
    client.close()


def test_failure_mail_links_to_the_payload_host(worker_env, smtp_servers):
    smtp = smtp_servers()
    worker_env.write_config(extra=smtp.config() + '\nhost "https://config-host.test"\n')
    build_id, _ = server_submit(worker_env, FAILING, host="https://server.example.org/", email="alice@example.test")
    worker_env.start_worker()
    assert worker_env.wait_status(build_id)["status"] == "failed"
    (received,) = smtp.wait(1)
    ((number,),) = worker_env.sql("SELECT number FROM builds WHERE id = :id", id=build_id)
    assert received.body.startswith(f"Build: https://server.example.org/b/alice/{number}\n")
    assert "config-host.test" not in received.body


def test_a_stale_member_that_names_no_set_does_not_block_the_custodian(client, consumers):
    keys = QueueKeys(QUEUE)
    client.set("not-a-set", "x")
    client.zadd(keys.consumers, {"not-a-set": 1})
    stale = keys.inflight(str(uuid.uuid4()))
    orphan = Job(str(uuid.uuid4()), encode_payload("", 4))
    client.zadd(keys.consumers, {stale: 2})
    client.sadd(stale, orphan.id)
    client.hset(keys.data, orphan.id, orphan.pack())
    recorder = Recorder()
    consumers(recorder)
    wait_for(lambda: recorder.jobs == [orphan], timeout=60, what="the orphan behind a bad member")
    assert client.zscore(keys.consumers, "not-a-set") is None and client.get("not-a-set") == b"x"
