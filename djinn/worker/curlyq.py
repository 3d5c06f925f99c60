"""The Djinn server's build queue: the curlyq protocol (github.com/mcmathja/curlyq) on Redis.

The Go server queues each build as a curlyq job on `builds_<driver>`; this
worker serves that queue beside its Celery queue of the same name. Keys of a
queue Q (curlyq's layout):

    Q:data                hash    job id -> msgpack {ID, Data, Attempt}
    Q:active              list    ids waiting to be taken (pushed right, taken left)
    Q:signal              list    one element while jobs wait (newer curlyq wakes on it)
    Q:consumers           zset    member Q:inflight:<consumer uuid>, score = last heartbeat (unix seconds)
    Q:inflight:<uuid>     set     ids a consumer has taken and not settled
    Q:scheduled           zset    ids to move back to active at score (retries)
    Q:dead                zset    ids that cannot be processed, score = when they died

A job's `Data` is the gob encoding of the server's Payload{Host, BuildID}
(djinn.worker.gob). Each job this worker takes becomes the Celery build task for its
build (djinn.worker.queue.enqueue) and is acknowledged only after that publish
succeeded: a worker killed in between leaves the job in its in-flight set, its
heartbeat goes stale, and a consumer (this worker's or a Go worker's)
re-enqueues it; the second Celery message finds the build running or finished
and the database lease (djinn.db.lease) drops it.

Timing follows curlyq's defaults, which the Go consumers of a Djinn
installation use: they beat every minute and treat a consumer as dead two
minutes after its last beat. This consumer beats more often (HEARTBEAT_INTERVAL)
but waits the same two minutes before taking another consumer's jobs, so a live
Go worker never loses its in-flight jobs to it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import select

from djinn.db.models import Build
from djinn.errors import DjinnError
from djinn.status import Status
from djinn.worker.context import WorkerContext
from djinn.worker.gob import GobError, decode_payload, encode_payload
from djinn.worker.kill import redis_client
from djinn.worker.queue import enqueue

log = logging.getLogger(__name__)

# curlyq's consumer defaults (HeartbeatPollInterval + CustodianConsumerTimeout = 2 min).
HEARTBEAT_INTERVAL = 15.0
STALE_AFTER = 120.0
CUSTODIAN_INTERVAL = 60.0
SCHEDULER_INTERVAL = 5.0
BATCH = 10
CLEANUP_BATCH = 50
MAX_BACKOFF = 30.0
# A job that could not be handed over (database or broker away) is tried again
# after at most this long; it is never sent to the dead set for that.
RETRY_MAX_BACKOFF = 60.0
# How long one wait on the signal list blocks. The Djinn server links curlyq
# v0.4.0, whose producer pushes no signal, so the active list is also polled
# after every wait: a job pushed that way is seen within this time.
POLL_TIMEOUT = 1


class DeadJob(DjinnError):
    """A job that can never be processed (undecodable, or naming no build): it goes to the dead set."""


class MalformedJob(DeadJob):
    """A job whose stored bytes are not a curlyq job."""


@dataclass(frozen=True)
class QueueKeys:
    """The Redis keys of curlyq queue `name`."""

    name: str

    @property
    def data(self) -> str:
        return f"{self.name}:data"

    @property
    def active(self) -> str:
        return f"{self.name}:active"

    @property
    def signal(self) -> str:
        return f"{self.name}:signal"

    @property
    def consumers(self) -> str:
        return f"{self.name}:consumers"

    @property
    def scheduled(self) -> str:
        return f"{self.name}:scheduled"

    @property
    def dead(self) -> str:
        return f"{self.name}:dead"

    def inflight(self, consumer_id: str) -> str:
        return f"{self.name}:inflight:{consumer_id}"


# -- the job record ---------------------------------------------------------------

_INT64 = (-(2**63), 2**63 - 1)


def _msgpack_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    n = len(raw)
    if n < 32:
        return bytes([0xA0 | n]) + raw
    if n < 256:
        return b"\xd9" + n.to_bytes(1, "big") + raw
    if n < 65536:
        return b"\xda" + n.to_bytes(2, "big") + raw
    raise ValueError("a curlyq job id or key longer than 65535 bytes")


def _msgpack_bin(b: bytes) -> bytes:
    n = len(b)
    if n < 256:
        return b"\xc4" + n.to_bytes(1, "big") + b
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big") + b
    return b"\xc6" + n.to_bytes(4, "big") + b


@dataclass(frozen=True)
class Job:
    """curlyq's Job{ID string; Data []byte; Attempt int}."""

    id: str
    data: bytes
    attempt: int = 0

    def pack(self) -> bytes:
        """The bytes vmihailenco/msgpack v4 writes for the Go struct.

        A map of the three field names in declaration order; strings as fixstr,
        str8 or str16; Data as bin8/16/32; Attempt, a Go int, always as a
        9-byte int64 (v4 does not shorten integers unless asked to).
        """
        if not _INT64[0] <= self.attempt <= _INT64[1]:
            raise ValueError(f"attempt {self.attempt} does not fit a Go int")
        return (
            b"\x83"
            + _msgpack_str("ID")
            + _msgpack_str(self.id)
            + _msgpack_str("Data")
            + _msgpack_bin(self.data)
            + _msgpack_str("Attempt")
            + b"\xd3"
            + self.attempt.to_bytes(8, "big", signed=True)
        )

    @classmethod
    def unpack(cls, raw: bytes) -> "Job":
        """Read a job as the Go decoder would: any msgpack encoding of the fields, extra fields ignored."""
        try:
            unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
            unpacker.feed(raw)
            value = unpacker.unpack()
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise MalformedJob(f"the job data is not msgpack ({type(exc).__name__}: {exc})") from None
        if isinstance(value, (list, tuple)) and len(value) == 3:  # encoded with StructAsArray
            fields = dict(zip((b"ID", b"Data", b"Attempt"), value, strict=True))
        elif isinstance(value, dict):
            fields = {k.encode() if isinstance(k, str) else k: v for k, v in value.items()}
        else:
            raise MalformedJob(f"the job data is a msgpack {type(value).__name__}, not a curlyq job")
        job_id, data, attempt = fields.get(b"ID", b""), fields.get(b"Data", b""), fields.get(b"Attempt", 0)
        if not isinstance(job_id, bytes) or not isinstance(data, bytes) and data is not None:
            raise MalformedJob("the job's ID or Data is not a string")
        if attempt is None:
            attempt = 0
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            raise MalformedJob("the job's Attempt is not an integer")
        try:
            return cls(job_id.decode("utf-8"), bytes(data or b""), attempt)
        except UnicodeDecodeError:
            raise MalformedJob("the job's ID is not UTF-8") from None


# -- Lua: each step of the protocol in one atomic script ------------------------------

# KEYS: data, active, signal. ARGV: id, job. Store the job unless its id exists, queue it, raise the signal.
PUSH = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[3], 1)
return 1
"""

# KEYS: consumers, active, inflight, data, signal. ARGV: count, member.
# Take up to `count` ids from the head of active into this consumer's in-flight
# set; returns id, data pairs (data false when missing). Refuses to take
# anything for a consumer that is not registered, so nothing is taken that no
# heartbeat protects. Clears the signal when the queue ran dry.
FETCH = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return redis.error_reply('consumer not registered')
end
local want = tonumber(ARGV[1])
local ids = redis.call('LRANGE', KEYS[2], 0, want - 1)
local out = {}
if #ids > 0 then
  redis.call('SADD', KEYS[3], unpack(ids))
  redis.call('LTRIM', KEYS[2], #ids, -1)
  local data = redis.call('HMGET', KEYS[4], unpack(ids))
  for i = 1, #ids do
    out[#out + 1] = ids[i]
    out[#out + 1] = data[i]
  end
end
if #ids < want then
  redis.call('DEL', KEYS[5])
end
return out
"""

# KEYS: inflight, data. ARGV: id. Done: forget the job (only if this consumer still holds it).
ACK = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# KEYS: inflight, dead, data. ARGV: id, now, job ('' keeps the stored bytes).
KILL = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
end
return 1
"""

# KEYS: inflight, scheduled, data. ARGV: id, when, job. Try again at `when`.
RETRY = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""

# KEYS: inflight, active, signal. ARGV: ids. Give back jobs taken but not started (shutdown).
GIVE_BACK = """
for _, id in ipairs(ARGV) do
  if redis.call('SREM', KEYS[1], id) == 1 then
    redis.call('RPUSH', KEYS[2], id)
  end
end
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[3], 1)
return 1
"""

# KEYS: consumers, active, signal. ARGV: expired_before, limit.
# Consumers whose last beat is at or before `expired_before` are dead: move
# their in-flight ids back to active (Attempt unchanged) and forget a consumer
# once its set is empty (a member naming no set is just forgotten). Returns how
# many ids moved.
REAP = """
local limit = tonumber(ARGV[2])
local left = limit
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], 0, ARGV[1], 'LIMIT', 0, limit)
for _, member in ipairs(dead) do
  local kind = redis.call('TYPE', member).ok
  local ids = {}
  if kind == 'set' then
    ids = redis.call('SPOP', member, left)
  end
  if #ids > 0 then
    redis.call('RPUSH', KEYS[2], unpack(ids))
  end
  if #ids < left then
    redis.call('ZREM', KEYS[1], member)
  end
  left = left - #ids
  if left <= 0 then
    break
  end
end
local moved = limit - left
if moved > 0 then
  redis.call('DEL', KEYS[3])
  redis.call('LPUSH', KEYS[3], 1)
end
return moved
"""

# KEYS: scheduled, active, signal. ARGV: now, limit. Move due retries to active.
DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], 0, ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], unpack(ids))
redis.call('ZREM', KEYS[1], unpack(ids))
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[3], 1)
return #ids
"""

# KEYS: consumers, inflight. ARGV: member. Leave the consumers set, unless jobs are still held.
LEAVE = """
if redis.call('SCARD', KEYS[2]) > 0 then
  return 0
end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def now_score() -> int:
    """A timestamp as curlyq writes it: whole unix seconds."""
    return int(time.time())


def push_job(client: redis.Redis, queue: str, job: Job) -> bool:
    """Queue `job` as curlyq's producer does; False when a job with its id exists already."""
    keys = QueueKeys(queue)
    return bool(client.eval(PUSH, 3, keys.data, keys.active, keys.signal, job.id, job.pack()))


def push_build(client: redis.Redis, queue: str, build_id: int, host: str = "") -> str:
    """Queue build `build_id` the way the Djinn server does; returns the new job's id."""
    job = Job(str(uuid.uuid4()), encode_payload(host, build_id))
    push_job(client, queue, job)
    return job.id


def pending_builds(client: redis.Redis, queue: str) -> set[int]:
    """Builds with a curlyq job on `queue` not yet acknowledged nor dead: waiting, in flight or scheduled.

    The reconciliation of queued builds (djinn.worker.reaper) counts these as queued in the
    broker: a Go worker's in-flight job is its to run, and a dead consumer's is
    re-enqueued by a custodian.
    """
    keys = QueueKeys(queue)
    dead = set(client.zrange(keys.dead, 0, -1))
    found: set[int] = set()
    for job_id, raw in client.hscan_iter(keys.data, count=500):
        if job_id in dead:
            continue
        try:
            found.add(decode_payload(Job.unpack(raw).data).build_id)
        except (DeadJob, GobError):
            continue
    return found


def backoff(attempt: int, limit: float) -> float:
    """curlyq's delay after `attempt` failures: 2^attempt/2 seconds, jittered by up to 2x, capped."""
    return float(min(limit, (1 + random.random()) * (2 ** min(attempt, 32)) / 2))


# -- the consumer -------------------------------------------------------------------


class Consumer:
    """A curlyq consumer of `queue`: `handler(job)` is called for each job, one at a time.

    The handler returns to have the job acknowledged, raises DeadJob to send it
    to the dead set, and raises anything else to have it tried again later (via
    the scheduled set, Attempt counted, as curlyq retries). Redis going away is
    logged and waited out with backoff; the threads never die of it.
    """

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        handler: Callable[[Job], None],
        *,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        stale_after: float = STALE_AFTER,
        custodian_interval: float = CUSTODIAN_INTERVAL,
        scheduler_interval: float = SCHEDULER_INTERVAL,
        poll_timeout: int = POLL_TIMEOUT,
        batch: int = BATCH,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.client = client
        self.keys = QueueKeys(queue)
        self.handler = handler
        self.id = str(uuid.uuid4())
        self.member = self.keys.inflight(self.id)
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.custodian_interval = custodian_interval
        self.scheduler_interval = scheduler_interval
        self.poll_timeout = max(1, int(poll_timeout))
        self.batch = batch
        self.max_backoff = max_backoff
        #: Poll rounds done (each took what was there and waited for the signal): how one sees the poller go round.
        self.polls = 0
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}

    # -- running --

    def start(self) -> "Consumer":
        for name, target in (("curlyq-keeper", self._keep), ("curlyq-poller", self._poll)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("curlyq %s: consuming as %s", self.keys.name, self.id)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop taking jobs; a job being handed over is finished first."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self.running:
            return
        try:
            self._run("leave", [self.keys.consumers, self.member], [self.member])
        except redis.RedisError as exc:
            log.info("curlyq %s: could not leave the consumers set (%s); it will be cleaned up", self.keys.name, exc)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[script](keys=keys, args=args)

    # -- the keeper: heartbeat, dead consumers, due retries --

    def register(self) -> None:
        """Beat: (re)enter the consumers set with the current time."""
        self.client.zadd(self.keys.consumers, {self.member: now_score()})
        self._registered.set()

    def reap(self) -> int:
        """Re-enqueue the in-flight jobs of consumers whose heartbeat went stale; how many moved."""
        moved = 0
        while True:
            count = int(self._run(
                "reap",
                [self.keys.consumers, self.keys.active, self.keys.signal],
                [now_score() - int(self.stale_after), CLEANUP_BATCH],
            ))
            moved += count
            if count < CLEANUP_BATCH:
                break
        if moved:
            log.warning("curlyq %s: re-enqueued %d job(s) of consumers that stopped beating", self.keys.name, moved)
        return moved

    def enqueue_due(self) -> int:
        """Move retries whose time came back to the active list."""
        total = 0
        while True:
            count = int(self._run(
                "due", [self.keys.scheduled, self.keys.active, self.keys.signal], [now_score(), CLEANUP_BATCH]
            ))
            total += count
            if count < CLEANUP_BATCH:
                return total

    def _keep(self) -> None:
        tasks: list[tuple[str, Callable[[], object], float]] = [
            ("heartbeat", self.register, self.heartbeat_interval),
            ("custodian", self.reap, self.custodian_interval),
            ("scheduler", self.enqueue_due, self.scheduler_interval),
        ]
        due = {name: 0.0 for name, _, _ in tasks}
        failures = {name: 0 for name, _, _ in tasks}
        while not self._stop.is_set():
            for name, action, interval in tasks:
                if self._stop.is_set() or time.monotonic() < due[name]:
                    continue
                try:
                    action()
                except redis.RedisError as exc:
                    failures[name] += 1
                    log.warning("curlyq %s: %s failed (attempt %d): %s", self.keys.name, name, failures[name], exc)
                    due[name] = time.monotonic() + backoff(failures[name], min(self.max_backoff, interval))
                except Exception:  # a bug must not end the heartbeat
                    log.exception("curlyq %s: %s failed", self.keys.name, name)
                    due[name] = time.monotonic() + interval
                else:
                    if failures[name]:
                        log.info("curlyq %s: %s works again", self.keys.name, name)
                    failures[name] = 0
                    due[name] = time.monotonic() + interval
            self._stop.wait(max(0.05, min(due.values()) - time.monotonic()))

    # -- the poller: take jobs, hand them over, settle them --

    def _poll(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if not self._registered.is_set():
                    self.register()
                taken = self._fetch()
                for index, (job_id, raw) in enumerate(taken):
                    if self._stop.is_set():
                        self._give_back([i for i, _ in taken[index:]])
                        return
                    self._process(job_id, raw)
                if len(taken) < self.batch and not self._stop.is_set():
                    self.client.brpoplpush(self.keys.signal, self.keys.signal, self.poll_timeout)
                self.polls += 1
                if failures:
                    log.info("curlyq %s: Redis is reachable again", self.keys.name)
                failures = 0
            except redis.ResponseError as exc:
                if "consumer not registered" in str(exc):
                    # Redis lost our entry (restarted without persistence) or a peer
                    # reaped us after a long stall: beat again before taking anything.
                    log.warning("curlyq %s: this consumer was not registered; registering again", self.keys.name)
                    self._registered.clear()
                    continue
                failures += 1
                log.warning("curlyq %s: polling failed (attempt %d): %s", self.keys.name, failures, exc)
                self._stop.wait(backoff(failures, self.max_backoff))
            except redis.RedisError as exc:
                failures += 1
                log.warning("curlyq %s: polling failed (attempt %d): %s", self.keys.name, failures, exc)
                self._stop.wait(backoff(failures, self.max_backoff))
            except Exception:  # a bug must not end the poller
                failures += 1
                log.exception("curlyq %s: polling failed", self.keys.name)
                self._stop.wait(backoff(failures, self.max_backoff))

    def _fetch(self) -> list[tuple[str, bytes | None]]:
        reply = self._run(
            "fetch",
            [self.keys.consumers, self.keys.active, self.member, self.keys.data, self.keys.signal],
            [self.batch, self.member],
        )
        pairs = []
        for i in range(0, len(reply), 2):
            job_id = reply[i].decode("utf-8", "replace") if isinstance(reply[i], bytes) else str(reply[i])
            pairs.append((job_id, reply[i + 1]))
        return pairs

    def _give_back(self, ids: list[str]) -> None:
        if ids:
            self._settle(lambda: self._run("give_back", [self.member, self.keys.active, self.keys.signal], ids))

    def _process(self, job_id: str, raw: bytes | None) -> None:
        """Hand one job to the handler, then record the outcome in Redis."""
        try:
            if raw is None:
                raise MalformedJob("the job has no data in the data hash")
            job = Job.unpack(raw)
        except MalformedJob as exc:
            self._kill(job_id, b"", str(exc))
            return
        if job.id != job_id:
            log.warning("curlyq %s: job %s carries the id %r; settling it under %s", self.keys.name, job_id, job.id, job_id)
        try:
            self.handler(job)
        except DeadJob as exc:
            self._kill(job_id, Job(job.id, job.data, job.attempt + 1).pack(), str(exc))
        except Exception as exc:
            delay = backoff(job.attempt, RETRY_MAX_BACKOFF)
            log.warning("curlyq %s: job %s could not be handed over (%s); trying again in %.0fs", self.keys.name, job_id, exc, delay)
            retried = Job(job.id, job.data, job.attempt + 1).pack()
            when = now_score() + max(1, round(delay))
            self._settle(lambda: self._run("retry", [self.member, self.keys.scheduled, self.keys.data], [job_id, when, retried]))
        else:
            self._settle(lambda: self._run("ack", [self.member, self.keys.data], [job_id]))

    def _kill(self, job_id: str, packed: bytes, reason: str) -> None:
        log.error("curlyq %s: job %s moved to the dead set: %s", self.keys.name, job_id, reason)
        self._settle(lambda: self._run("kill", [self.member, self.keys.dead, self.keys.data], [job_id, now_score(), packed]))

    def _settle(self, step: Callable[[], object]) -> None:
        """Run a Redis step that records a job's outcome, waiting out Redis failures.

        Given up only on stop: the job then stays in this consumer's in-flight
        set, and is re-enqueued by a peer once this consumer's beat is stale.
        """
        failures = 0
        while True:
            try:
                step()
                return
            except redis.RedisError as exc:
                failures += 1
                log.warning("curlyq %s: recording a job's outcome failed (attempt %d): %s", self.keys.name, failures, exc)
                if self._stop.wait(backoff(failures, self.max_backoff)):
                    return


_SCRIPTS = {
    "fetch": FETCH,
    "ack": ACK,
    "kill": KILL,
    "retry": RETRY,
    "give_back": GIVE_BACK,
    "reap": REAP,
    "due": DUE,
    "leave": LEAVE,
}


# -- in the worker ----------------------------------------------------------------------


def hand_off(ctx: WorkerContext) -> Callable[[Job], None]:
    """The handler the worker runs for each curlyq job: the job's build becomes a Celery build task."""
    def handle(job: Job) -> None:
        try:
            payload = decode_payload(job.data)
        except GobError as exc:
            raise DeadJob(f"the job's data is not a build payload: {exc}") from None
        if payload.build_id <= 0:
            raise DeadJob(f"the job's payload names build {payload.build_id}")
        with ctx.sessions() as session:
            status = session.scalar(select(Build.status).where(Build.id == payload.build_id))
        if status is None:
            raise DeadJob(f"build {payload.build_id} does not exist")
        if Status(status).finished:
            log.info("curlyq %s: build %s is %s already; job %s needs no run", ctx.config.queue, payload.build_id, status, job.id)
            return
        enqueue(ctx.app, payload.build_id, ctx.config.queue, host=payload.host or None)
        log.info("curlyq %s: job %s handed build %s to Celery", ctx.config.queue, job.id, payload.build_id)

    return handle


def start_for_worker(ctx: WorkerContext) -> Consumer:
    """Serve the worker's curlyq queue (the Celery queue's namesake) until stopped."""
    # No retries inside redis-py: the consumer backs off itself, and a stop must not
    # wait for a client retrying a Redis that is away.
    client = redis_client(
        ctx.config.redis,
        socket_timeout=POLL_TIMEOUT + 10,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )
    return Consumer(client, ctx.config.queue, hand_off(ctx)).start()
