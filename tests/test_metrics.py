"""Metrics, health and logs of real worker processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from docker_support import IMAGE
from ops_support import health, http_get, main_signal, scrape, value, wait_exit, wait_for, wait_job_running
from services import free_port
from worker_support import WORKER

from djinn.observe import logs

DASHBOARD = Path(__file__).resolve().parent.parent / "dist" / "grafana" / "djinn-workers.json"

PASSING = """
driver: {type: os}
stages: [build, test]
jobs:
  - {stage: build, commands: ["echo building"]}
  - {stage: test, commands: ["echo testing"]}
"""
FAILING = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['exit 3']}\n"
SLOW = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo slow', 'sleep 5.5']}\n"


def _with_metrics(env) -> int:
    port = free_port()
    env.write_config(extra=f'metrics "127.0.0.1:{port}"')
    return port


def _settled(port: int, name: str, expected: float, **labels: str) -> dict:
    """Scrape until `name{labels}` reaches `expected` (events arrive just after the rows are written)."""
    return wait_for(
        lambda: (lambda s: s if value(s, name, **labels) == expected else None)(scrape(port)),
        15,
        f"{name}{labels} == {expected}",
    )


def test_counters_and_histograms_move_with_builds(worker_env):
    port = _with_metrics(worker_env)
    worker_env.start_worker()
    before = scrape(port)
    assert value(before, "djinn_builds_started_total", driver="os") == 0
    assert value(before, "djinn_builds_running", driver="os") == 0
    assert value(before, "djinn_worker_info", driver="os", queue="builds_os", version="0.1.0") == 1
    assert value(before, "djinn_worker_parallelism") == 2

    builds = [worker_env.submit(PASSING), worker_env.submit(PASSING), worker_env.submit(FAILING)]
    for build_id in builds:
        worker_env.wait_status(build_id)

    slow = worker_env.submit(SLOW)
    wait_job_running(worker_env, slow)
    during = _settled(port, "djinn_builds_running", 1, driver="os")
    assert value(during, "djinn_builds_started_total", driver="os") == 4
    assert worker_env.wait_status(slow)["status"] == "passed"

    after = _settled(port, "djinn_builds_finished_total", 3, driver="os", status="passed", reason="none")
    assert value(after, "djinn_builds_started_total", driver="os") == 4
    assert value(after, "djinn_builds_finished_total", driver="os", status="failed", reason="script") == 1
    assert value(after, "djinn_builds_running", driver="os") == 0

    # Histograms: one observation per build / job / creation, sums that are real durations.
    assert value(after, "djinn_build_duration_seconds_count", driver="os", status="passed") == 3
    assert value(after, "djinn_build_duration_seconds_count", driver="os", status="failed") == 1
    assert value(after, "djinn_build_duration_seconds_sum", driver="os", status="passed") >= 5.5  # the slow one slept 5.5s
    assert value(after, "djinn_build_duration_seconds_bucket", driver="os", status="passed", le="5.0") == 2
    assert value(after, "djinn_build_duration_seconds_bucket", driver="os", status="passed", le="10.0") == 3
    assert value(after, "djinn_build_duration_seconds_bucket", driver="os", status="passed", le="+Inf") == 3
    assert value(after, "djinn_job_duration_seconds_count", driver="os", status="passed") == 5  # 2 + 2 + 1
    assert value(after, "djinn_job_duration_seconds_count", driver="os", status="failed") == 1
    assert value(after, "djinn_build_queue_wait_seconds_count", driver="os") == 4
    assert value(after, "djinn_build_queue_wait_seconds_sum", driver="os") > 0
    assert value(after, "djinn_driver_create_duration_seconds_count", driver="os", status="passed") == 4
    assert value(after, "djinn_metrics_events_dropped_total") == 0


def test_health_fails_while_redis_or_postgres_is_down(worker_env, redis_server, postgres):
    port = _with_metrics(worker_env)
    worker_env.start_worker()
    code, body = health(port)
    assert code == 200, body
    assert body["broker"]["ok"] and body["database"]["ok"] and body["status"] == "ok"

    redis_server.stop()
    try:
        code, body = health(port)
        assert code == 503, body
        assert body["status"] == "unhealthy"
        assert not body["broker"]["ok"] and body["database"]["ok"]
        assert "Connection" in body["broker"]["detail"]
    finally:
        redis_server.start()
    wait_for(lambda: health(port)[0] == 200, 30, "health to come back with Redis")
    # Celery noticed the lost broker connection; the worker counted it.
    wait_for(lambda: value(scrape(port), "djinn_errors_total", kind="broker") >= 1, 60, "a broker error to be counted")

    postgres.stop()
    try:
        code, body = health(port)
        assert code == 503, body
        assert body["broker"]["ok"] and not body["database"]["ok"]
        # The reaper's passes fail meanwhile: counted as database errors.
        wait_for(lambda: value(scrape(port), "djinn_errors_total", kind="database") >= 1, 30, "a database error to be counted")
    finally:
        postgres.start()
    wait_for(lambda: health(port)[0] == 200, 30, "health to come back with PostgreSQL")
    # The worker went on: it still runs builds.
    assert worker_env.wait_status(worker_env.submit(FAILING), timeout=60)["status"] == "failed"


def test_exposition_has_process_metrics_errors_and_no_created_series(worker_env):
    from prometheus_client.parser import text_string_to_metric_families

    port = _with_metrics(worker_env)
    proc = worker_env.start_worker()
    code, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = [s for f in families.values() for s in f.samples]
    assert not [s.name for s in samples if s.name.endswith("_created")]
    # process_* describe the worker's main process (the default ProcessCollector).
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
        assert name in families, sorted(families)
    assert families["process_start_time_seconds"].samples[0].value == pytest.approx(_start_time(proc.pid), abs=2)
    errors = {s.labels["kind"]: s.value for s in families["djinn_errors"].samples if s.name == "djinn_errors_total"}
    assert errors == {"database": 0, "broker": 0, "driver": 0, "internal": 0, "notify": 0}
    assert families["djinn_builds_finished"].type == "counter"

    # Every expression of the Grafana dashboard in dist/ names series this exposition has.
    exposed = _series_names(families.values())
    expressions = _dashboard_expressions()
    assert len(expressions) > 20
    for expr in expressions:
        names = set(re.findall(r"\b(?:djinn|process)_[a-z0-9_]+\b", expr))
        assert names, f"no metric in {expr!r}"
        assert names <= exposed, f"{expr!r} names {sorted(names - exposed)}, which /metrics does not have"


def _series_names(families) -> set[str]:
    """The names a query can use: also those of labelled families that have no sample yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for family in families:
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels) -> None:
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["query"]["query"])
    return found


def _start_time(pid: int) -> float:
    """When process `pid` started, in seconds since the epoch (from /proc, as ProcessCollector reads it)."""
    ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_script_and_driver_failures_have_their_own_reasons(worker_env, docker_api):
    port = _with_metrics(worker_env)
    worker_env.write_config(driver="docker", driver_config="driver docker {}\n", extra=f'metrics "127.0.0.1:{port}"')
    worker_env.start_worker()
    script = worker_env.submit(f"driver: {{type: docker, image: '{IMAGE}', workspace: /build}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['exit 3']}}\n")
    missing = worker_env.submit("driver: {type: docker, image: 'djinn-test/no-such-image:none', workspace: /build}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n")
    assert worker_env.wait_status(script, timeout=120)["status"] == "failed"
    assert worker_env.wait_status(missing, timeout=120)["status"] == "failed"
    after = _settled(port, "djinn_builds_finished_total", 1, driver="docker", status="failed", reason="driver")
    assert value(after, "djinn_builds_finished_total", driver="docker", status="failed", reason="script") == 1
    assert value(after, "djinn_errors_total", kind="driver") == 1  # the script's failure is the build's, not an error
    assert value(after, "djinn_errors_total", kind="internal") == 0


def test_failure_reasons_of_every_final_status():
    from djinn.observe import metrics

    assert metrics.failure_reason("passed") == metrics.failure_reason("passed_with_failures") == "none"
    assert metrics.failure_reason("handed_back") == "none"
    assert metrics.failure_reason("failed", "script") == "script"
    assert metrics.failure_reason("failed", "driver") == "driver"
    assert metrics.failure_reason("failed", None) == "system"  # failed before it ran: it could not be loaded
    assert metrics.failure_reason("killed") == "killed"
    assert metrics.failure_reason("timed_out") == "timeout"
    assert metrics.failure_reason("error") == metrics.failure_reason("lease_lost") == "system"


def test_error_kinds_of_exceptions():
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError
    from sqlalchemy.exc import OperationalError

    from djinn.db.engine import DatabaseError
    from djinn.errors import DriverError
    from djinn.observe import metrics

    assert metrics.error_kind(OperationalError("SELECT 1", {}, Exception("server closed the connection"))) == "database"
    assert metrics.error_kind(DatabaseError("cannot connect to PostgreSQL")) == "database"
    assert metrics.error_kind(redis.ConnectionError("refused")) == "broker"
    assert metrics.error_kind(KombuOperationalError("refused")) == "broker"
    assert metrics.error_kind(DriverError("no such image")) == "driver"
    assert metrics.error_kind(KeyError("bug")) == "internal"


def test_handed_back_build_counted_as_such(worker_env):
    port = _with_metrics(worker_env)
    proc = worker_env.start_worker()
    build_id = worker_env.submit(SLOW.replace("sleep 5.5", "sleep 40"))
    wait_job_running(worker_env, build_id)
    _settled(port, "djinn_builds_running", 1, driver="os")
    main_signal(proc, signal.SIGTERM)
    during = _settled(port, "djinn_worker_shutting_down", 1)
    code, body = health(port)
    assert code == 200 and body["shutdown"] == "draining"
    assert value(during, "djinn_builds_running", driver="os") == 1
    main_signal(proc, signal.SIGTERM)
    # The listener lives as long as the worker: read the counter before it exits.
    wait_for(
        lambda: value(scrape(port), "djinn_builds_finished_total", driver="os", status="handed_back", reason="none") == 1,
        15,
        "the hand-back to be counted",
    )
    assert wait_exit(proc, 30, worker_env) == 0


def test_celery_command_serves_metrics_too(worker_env):
    port = _with_metrics(worker_env)
    worker_env.start_worker(celery=True, name="celery")
    assert worker_env.wait_status(worker_env.submit(FAILING))["status"] == "failed"
    _settled(port, "djinn_builds_finished_total", 1, driver="os", status="failed", reason="script")


def test_taken_metrics_port_stops_the_start_with_a_clear_error(worker_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker_env.write_config(extra=f'metrics "127.0.0.1:{port}"')
        res = subprocess.run(
            [WORKER, "-config", str(worker_env.config), "-driver", str(worker_env.driver_config)],
            capture_output=True, text=True, timeout=60,
        )
    assert res.returncode == 1
    assert f'metrics "127.0.0.1:{port}": cannot listen: Address already in use' in res.stderr
    assert "Traceback" not in res.stderr


# -- logs ----------------------------------------------------------------------

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def _parse(line: str) -> dict[str, str]:
    fields = {k: (v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v) for k, v in FIELD.findall(line)}
    # Every character of the line belongs to a field: nothing unstructured.
    assert " ".join(f"{m.group(0)}" for m in FIELD.finditer(line)) == line, line
    return fields


def test_log_lines_are_structured_with_build_and_job(worker_env):
    worker_env.start_worker()
    build_id = worker_env.submit(SLOW.replace("sleep 5.5", "sleep 30"))
    wait_job_running(worker_env, build_id)
    worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id)["status"] == "killed"
    wait_for(lambda: f"build {build_id}: killed" in (worker_env.root / "worker.log").read_text(), 10, "the final line")

    lines = [_parse(line) for line in (worker_env.root / "worker.log").read_text().splitlines()]
    for fields in lines:
        assert {"time", "level", "process", "logger", "msg"} <= fields.keys(), fields
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])
        assert fields["level"] in ("debug", "info", "warning", "error", "critical")
    claimed = [f for f in lines if f["msg"].endswith("claimed (attempt 1)")]
    assert claimed and claimed[0]["build"] == str(build_id) and "job" not in claimed[0]
    # Logged by the kill listener's thread while job a.1 ran: both are named.
    (kill,) = [f for f in lines if "kill received" in f["msg"]]
    assert (kill["build"], kill["job"]) == (str(build_id), "a.1")
    # Lines of the main process about no build carry no build.
    assert all("build" not in f for f in lines if f["msg"].endswith(" ready."))
    # At info, one line at the claim and one at the end per build: not Celery's per task as well.
    assert not [f for f in lines if f["logger"] in logs.PER_TASK_LOGGERS]


def test_celery_lines_per_task_at_debug(worker_env):
    log = worker_env.root / "worker.log"
    worker_env.config.write_text(worker_env.config.read_text().replace(f'log info "{log}"', f'log debug "{log}"'))
    worker_env.start_worker()
    build_id = worker_env.submit(PASSING)
    assert worker_env.wait_status(build_id)["status"] == "passed"
    wait_for(lambda: " succeeded in " in log.read_text(), 10, "Celery's line for the finished task")
    lines = [_parse(line) for line in log.read_text().splitlines()]
    assert {f["logger"] for f in lines if f["level"] == "info"} >= set(logs.PER_TASK_LOGGERS)
    assert any(f["msg"].endswith(" received") for f in lines if f["logger"] == "celery.worker.strategy")


def test_log_level_from_config(worker_env):
    log = worker_env.root / "quiet.log"
    text = worker_env.config.read_text()
    worker_env.config.write_text(text.replace(f'log info "{worker_env.root}/worker.log"', f'log warn "{log}"'))
    proc = subprocess.Popen(
        [WORKER, "-config", str(worker_env.config), "-driver", str(worker_env.driver_config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    worker_env.processes.append(proc)
    assert worker_env.wait_status(worker_env.submit(PASSING), timeout=60)["status"] == "passed"
    main_signal(proc, signal.SIGTERM)
    assert wait_exit(proc, 30, worker_env) == 0
    lines = [_parse(line) for line in log.read_text().splitlines()]
    assert any("graceful shutdown" in f["msg"] and f["level"] == "warning" for f in lines)
    assert not [f for f in lines if f["level"] in ("debug", "info")]
