"""Prometheus metrics and the health endpoint of a worker (the config's `metrics "ADDR:PORT"`).

Builds run in Celery pool processes, the HTTP listener lives in the main
process. Rather than prometheus_client's multiprocess mode (a directory of
mmap files per process that must be wiped at start and cleaned after every
pool process that dies), each pool process sends one small datagram per event
(build started/finished, job finished, driver created) over a Unix socket pair
made in the main process before the pool forks; the main process folds them
into ordinary metrics in its own registry. Sending never blocks a build: a
datagram that cannot be sent at once is dropped and counted. With the solo or
threads pool the events are applied in-process.

Served on the listen address:
- `/metrics`: Prometheus text format;
- `/healthz`: 200 when Redis and PostgreSQL answer, 503 otherwise (JSON body).

`djinn_builds_running` is computed when scraped from the builds started and not
finished, leaving out those of a pool process that no longer exists (killed
mid-build), so it cannot drift.

For an operator used to GitLab Runner's set: `process_*` of the main process,
`djinn_errors_total{kind}` (database, broker, driver, internal, notify) and a
`reason` on every finished build (script, driver, system, killed, timeout; `none`
for a build that passed or was handed back). Counters carry no `*_created` series.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import DBAPIError, DisconnectionError

from djinn import __version__
from djinn.config import WorkerConfig, split_address
from djinn.errors import DatabaseError, DjinnError, DriverError
from djinn.observe import logs
from djinn.plan import CREATE_DRIVER, JobPlan
from djinn.runner.engine import DRIVER, SCRIPT, SYSTEM, Reporter
from djinn.status import Status

#: What /healthz asks: whether the worker's services answer, and each one's result.
HealthCheck = Callable[[], tuple[bool, list[Any]]]

log = logging.getLogger(__name__)

HANDED_BACK = "handed_back"
LOST = "lease_lost"
ERROR = "error"

BUILD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 7200, float("inf"))
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))
CREATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, float("inf"))

# djinn_errors_total{kind}: where the worker met a problem that was not a build's own.
DATABASE = "database"
BROKER = "broker"
INTERNAL = "internal"
NOTIFY = "notify"
ERROR_KINDS = (DATABASE, BROKER, DRIVER, INTERNAL, NOTIFY)
# The reason label of a finished build.
KILLED = "killed"
TIMEOUT = "timeout"
NO_REASON = "none"


_sock: socket.socket | None = None  # the sending end, inherited by pool processes
_owner_pid: int | None = None
_exporter: "Exporter | None" = None


def enabled() -> bool:
    return _sock is not None


def emit(kind: str, **fields: Any) -> None:
    """Record an event for the metrics; a no-op when metrics are off."""
    if _sock is None:
        return
    event = {"kind": kind, "pid": os.getpid(), **fields}
    if os.getpid() == _owner_pid and _exporter is not None:
        _exporter.apply(event)
        return
    try:
        _sock.send(json.dumps(event).encode(), socket.MSG_DONTWAIT)
    except OSError:
        pass  # the main process is gone or swamped: a lost sample must not hurt the build


@dataclass
class Outcome:
    """What the build_finished event tells: the final status and, for a failed build, what failed."""

    status: str = ERROR
    failure: str | None = None  # djinn.runner.engine.SCRIPT, DRIVER or SYSTEM


def failure_reason(status: str, failure: str | None = None) -> str:
    """The `reason` label of a finished build."""
    if status == "killed":
        return KILLED
    if status == "timed_out":
        return TIMEOUT
    if status == "failed":
        return failure if failure in (SCRIPT, DRIVER, SYSTEM) else SYSTEM
    if status in (ERROR, LOST):
        return SYSTEM  # the worker could not finish it: the database, the broker or a bug
    return NO_REASON


def error_kind(exc: BaseException) -> str:
    """The `kind` label of djinn_errors_total for an exception."""
    if isinstance(exc, (DBAPIError, DisconnectionError, DatabaseError)):
        return DATABASE
    if isinstance(exc, (redis.RedisError, KombuOperationalError)):
        return BROKER
    if isinstance(exc, DriverError):
        return DRIVER
    return INTERNAL


def error(exc: BaseException | str) -> None:
    """Count an error for djinn_errors_total: an exception (its kind is worked out) or a kind."""
    if _sock is None:
        return
    emit("error", error_kind=exc if isinstance(exc, str) else error_kind(exc))


def task_failed(sender: Any = None, exception: BaseException | None = None) -> None:
    """A Celery task that ended in an exception: a build the worker could not run, a notification not sent."""
    if exception is None or isinstance(exception, tuple(getattr(sender, "throws", None) or ())):
        return  # an expected result (BuildFailed: the build failed), not a problem of the worker
    kind = error_kind(exception)
    if kind == INTERNAL and getattr(sender, "name", "") != "djinn.run_build":
        kind = NOTIFY
    error(kind)


class _BrokerErrorCounter(logging.Filter):
    """Counts Celery's "connection to the broker lost/refused" lines; changes nothing in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.msg in _broker_messages():
            error(BROKER)
        return True


def _broker_messages() -> tuple[str, ...]:
    try:  # Celery's own module: read only in a worker, where Celery is loaded anyway
        from celery.worker.consumer import consumer
    except ImportError:
        return ()
    return tuple(getattr(consumer, name) for name in ("CONNECTION_RETRY", "CONNECTION_ERROR") if hasattr(consumer, name))


class JobMetrics(Reporter):
    """Times a build's jobs for the metrics and names the running job in log lines (beside its other reporters)."""

    def __init__(self, build_id: int, driver: str) -> None:
        self.build_id = build_id
        self.driver = driver
        self._started: dict[tuple[str, str], float] = {}

    def job_started(self, job: JobPlan) -> None:
        self._started[job.key] = time.monotonic()
        logs.set_job(self.build_id, job.name)

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        started = self._started.pop(job.key, None)
        if ran and started is not None:
            seconds = time.monotonic() - started
            if job.name == CREATE_DRIVER:
                emit("driver_created", driver=self.driver, status=str(status), seconds=seconds)
            else:
                emit("job_finished", driver=self.driver, status=str(status), seconds=seconds)
        logs.set_job(self.build_id, None)


def parse_address(value: str) -> tuple[str, int]:
    """`host:port`, `:port` (every interface) or `[v6]:port`."""
    try:
        host, port = split_address(value)
    except ValueError:
        raise DjinnError(f'metrics "{value}": expected a listen address HOST:PORT, e.g. "127.0.0.1:9102"') from None
    return host or "0.0.0.0", port


class Exporter:
    """The main process's side: the registry, the event receiver and the HTTP listener."""

    def __init__(self, config: WorkerConfig, health: HealthCheck, phase: Callable[[], str]) -> None:
        try:  # optional: only a worker whose config sets `metrics` needs it
            import prometheus_client
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        except ImportError:
            raise DjinnError("the worker config sets `metrics` but prometheus_client is not installed (pip install prometheus_client)") from None
        self.config = config
        self.driver = config.driver
        self._running: dict[int, tuple[str, int]] = {}  # build id -> (driver, pid)
        self._lock = threading.Lock()
        self.health = health
        self.phase = phase
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # a *_created beside every counter only clutters
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_*: the main process's CPU, memory, open files, start time
        self.errors = Counter(
            "djinn_errors",
            "Problems the worker met that were not a build's own, by kind: "
            "database, broker, driver (a build environment failed), internal (a bug), notify.",
            ["kind"],
            registry=r,
        )
        self.started = Counter("djinn_builds_started_total", "Builds this worker started.", ["driver"], registry=r)
        self.finished = Counter(
            "djinn_builds_finished_total",
            "Builds this worker finished, by final status (handed_back: given back to another worker at shutdown) "
            "and reason: script, driver, system, killed, timeout, or none.",
            ["driver", "status", "reason"],
            registry=r,
        )
        self.build_seconds = Histogram(
            "djinn_build_duration_seconds", "Run time of finished builds.", ["driver", "status"], buckets=BUILD_BUCKETS, registry=r
        )
        self.job_seconds = Histogram(
            "djinn_job_duration_seconds", "Run time of jobs that ran.", ["driver", "status"], buckets=JOB_BUCKETS, registry=r
        )
        self.wait_seconds = Histogram(
            "djinn_build_queue_wait_seconds", "From a build's creation to its start.", ["driver"], buckets=WAIT_BUCKETS, registry=r
        )
        self.create_seconds = Histogram(
            "djinn_driver_create_duration_seconds",
            "Time to create the driver and place objects and keys.",
            ["driver", "status"],
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.dropped = Counter("djinn_metrics_events_dropped_total", "Metric events that could not be read.", registry=r)
        info = Gauge("djinn_worker_info", "The worker's driver, queue and version.", ["driver", "queue", "version"], registry=r)
        info.labels(config.driver, config.queue, __version__).set(1)
        Gauge("djinn_worker_parallelism", "Builds the worker runs at once.", registry=r).set(config.resolved_parallelism)
        draining = Gauge("djinn_worker_shutting_down", "1 once the worker was asked to stop.", registry=r)
        draining.set_function(lambda: 0 if self.phase() == "running" else 1)
        r.register(_RunningCollector(self))
        # Pre-create the common series so dashboards see zeros rather than nothing.
        self.started.labels(self.driver)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self._recv, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._recv.set_inheritable(False)
        self.server: ThreadingHTTPServer | None = None

    # -- events

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        driver = str(event.get("driver") or self.driver)
        with self._lock:
            if kind == "build_started":
                self.started.labels(driver).inc()
                self._running[int(event["build"])] = (driver, int(event.get("pid") or 0))
                if event.get("wait") is not None:
                    self.wait_seconds.labels(driver).observe(max(0.0, float(event["wait"])))
            elif kind == "build_finished":
                status = str(event.get("status"))
                failure = event.get("failure")
                self._running.pop(int(event["build"]), None)
                self.finished.labels(driver, status, failure_reason(status, failure)).inc()
                if status == "failed" and failure == DRIVER:
                    self.errors.labels(DRIVER).inc()
                if event.get("seconds") is not None and status not in (HANDED_BACK, LOST, ERROR):
                    self.build_seconds.labels(driver, status).observe(float(event["seconds"]))
            elif kind == "job_finished":
                self.job_seconds.labels(driver, str(event.get("status"))).observe(float(event["seconds"]))
            elif kind == "error":
                self.errors.labels(str(event.get("error_kind") or INTERNAL)).inc()
            elif kind == "driver_created":
                self.create_seconds.labels(driver, str(event.get("status"))).observe(float(event["seconds"]))

    def running(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for build_id, (driver, pid) in list(self._running.items()):
                if pid and pid != os.getpid() and not _alive(pid):
                    del self._running[build_id]  # its pool process died mid-build; the reaper reruns it
                    continue
                counts[driver] = counts.get(driver, 0) + 1
        counts.setdefault(self.driver, 0)
        return counts

    def _receive(self) -> None:
        while True:
            try:
                data = self._recv.recv(65536)
            except OSError:
                return
            try:
                self.apply(json.loads(data))
            except Exception:  # a malformed event is dropped, counted, and the next one read
                self.dropped.inc()

    # -- HTTP

    def start(self) -> None:
        host, port = parse_address(self.config.metrics or "")
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "djinn-worker"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    self._reply(200, generate_latest(exporter.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/health"):
                    ok, checks = exporter.health()
                    body = {"status": "ok" if ok else "unhealthy", "shutdown": exporter.phase()}
                    body.update({c.name: c.as_dict() for c in checks})
                    self._reply(200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json")
                elif path == "/":
                    self._reply(200, b"djinn-worker: /metrics /healthz\n", "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("metrics %s: " + format, self.client_address[0], *args)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self.server = server_class((host, port), Handler)
        except OSError as exc:
            raise DjinnError(f'metrics "{self.config.metrics}": cannot listen: {exc.strerror or exc}') from None
        self.server.socket.set_inheritable(False)
        threading.Thread(target=self._receive, name="metrics-events", daemon=True).start()
        logging.getLogger("celery.worker.consumer.consumer").addFilter(_BrokerErrorCounter())
        threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics and health on http://%s:%s/metrics and /healthz", host, self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _RunningCollector:
    """djinn_builds_running; prometheus_client is optional, so it is imported where an exporter uses it."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterable[Any]:
        # prometheus_client is optional: loaded only once a worker serves metrics.
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("djinn_builds_running", "Builds this worker runs now.", labels=["driver"])
        for driver, count in sorted(self.exporter.running().items()):
            family.add_metric([driver], count)
        yield family

    def describe(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily  # optional, as in collect

        return [GaugeMetricFamily("djinn_builds_running", "Builds this worker runs now.", labels=["driver"])]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(config: WorkerConfig, health: HealthCheck, phase: Callable[[], str]) -> Exporter | None:
    """Start the listener and the event socket in this (the main) process, before the pool forks.

    Idempotent; returns None when the config has no `metrics`. Raises DjinnError
    when the address is invalid or taken.
    """
    global _sock, _owner_pid, _exporter
    if not config.metrics:
        return None
    if _exporter is not None and _owner_pid == os.getpid():
        return _exporter
    exporter = Exporter(config, health, phase)
    exporter.start()
    _exporter, _owner_pid, _sock = exporter, os.getpid(), exporter._send
    return exporter


def stop() -> None:
    global _exporter, _sock, _owner_pid
    if _exporter is not None and _owner_pid == os.getpid():
        _exporter.stop()
        _exporter, _sock, _owner_pid = None, None, None
