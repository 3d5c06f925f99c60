"""dist/: the systemd unit and the SysVinit script, checked by their own tools and run for real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ops_support import main_signal, process_tree, processes_with, wait_exit, wait_for, wait_job_running
from worker_support import WORKER

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "dist" / "systemd" / "djinn-worker@.service"
SCRIPT = ROOT / "dist" / "sysvinit" / "djinn-worker"

SLOW = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo slow', 'sleep 3', 'echo done']}\n"
LONG = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 47.75']}\n"


# -- systemd -----------------------------------------------------------------------


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def _unit_command(key: str, instance: str) -> list[str]:
    """An Exec line as systemd runs it; the unit uses only %i, %% and $$ of systemd's escapes."""
    (value,) = _unit_values(key)
    assert not re.search(r"%[^i%]", value), f"{key} uses a specifier this test does not know"
    assert not re.search(r"(?<!\$)\$(?!\$)", value.replace("$$", "")), f"{key} relies on systemd's own $VAR expansion"
    return shlex.split(value.replace("%i", instance).replace("%%", "%").replace("$$", "$"))


def _unit_environment(instance: str) -> dict[str, str]:
    env = {}
    for value in _unit_values("Environment"):
        name, _, val = value.partition("=")
        env[name] = val.replace("%i", instance)
    return env


def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` works without systemd as PID 1 on a copy of the unit in a directory of its own."""
    shutil.copy(UNIT, tmp_path / UNIT.name)
    for instance in ("docker", "qemu-x86_64"):
        res = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / f"djinn-worker@{instance}.service")],
            capture_output=True, text=True, timeout=60,
        )
        assert (res.returncode, res.stdout, res.stderr) == (0, "", ""), res.stderr


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt value is reported."""
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "djinn-worker@docker.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert "Failed to parse kill mode" in res.stderr


def test_systemd_unit_stops_with_the_workers_two_signals():
    assert _unit_values("KillMode") == ["mixed"]  # the main process only: pool processes hand back only when told
    assert _unit_values("KillSignal") == ["SIGTERM"]
    assert _unit_values("Restart") == ["on-failure"]
    assert _unit_values("User") == ["djinn"]
    (timeout,) = _unit_values("TimeoutStopSec")
    assert re.fullmatch(r"\d+min", timeout) and int(timeout[:-3]) > 30  # longer than the default build timeout
    assert _unit_values("ExecReload") == ["/bin/kill -HUP $MAINPID"]


def _wait_ready(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        return path.exists() and " ready." in path.read_text(errors="replace")

    wait_for(ready, timeout, f"a ready worker logging to {path}")


def test_systemd_exec_lines_start_and_drain_the_worker(worker_env):
    etc = worker_env.root / "etc"
    etc.mkdir()
    shutil.copy(worker_env.config, etc / "worker.conf")
    shutil.copy(worker_env.driver_config, etc / "driver.conf")
    env = {**os.environ, **_unit_environment("os"), "DJINN_CONFIG_DIR": str(etc), "DJINN_WORKER": WORKER}
    assert env["DJINN_INSTANCE"] == "os"

    def exec_start() -> subprocess.Popen:
        proc = subprocess.Popen(
            _unit_command("ExecStart", "os"), env=env, cwd=worker_env.root, start_new_session=True,
            stdout=open(worker_env.root / "unit.out", "ab"), stderr=subprocess.STDOUT,
        )
        worker_env.processes.append(proc)
        return proc

    proc = exec_start()
    _wait_ready(worker_env.root / "worker.log", proc)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert str(etc / "worker.conf").encode() in cmdline  # exec'd: the main PID is the worker itself

    build_id = worker_env.submit(SLOW)
    wait_job_running(worker_env, build_id)
    stop = subprocess.Popen(_unit_command("ExecStop", "os"), env={**env, "MAINPID": str(proc.pid)})
    # ExecStop waits while the build drains: it signalled, and went into its wait loop.
    wait_for(lambda: len(process_tree(stop.pid)) > 1 or stop.poll() is not None, 30, "ExecStop to wait")
    assert stop.poll() is None and worker_env.status(build_id)["status"] == "running"
    assert wait_exit(proc, 30) == 0  # (here the test reaps the worker, as systemd would)
    assert stop.wait(10) == 0
    assert worker_env.status(build_id)["status"] == "passed"

    # systemd runs ExecStop without MAINPID when the main process is gone already.
    assert subprocess.run(_unit_command("ExecStop", "os"), env=env, timeout=10).returncode == 0

    # A per-instance file wins over worker.conf.
    (etc / "worker-os.conf").write_text(f'include "worker.conf"\nlog info "{worker_env.root}/instance.log"\n')
    proc = exec_start()
    _wait_ready(worker_env.root / "instance.log", proc)
    main_signal(proc, signal.SIGTERM)
    assert wait_exit(proc, 30) == 0


# -- SysVinit -------------------------------------------------------------------------


class Script:
    """The SysVinit script installed as djinn-worker-os, its settings in a defaults file."""

    def __init__(self, env, drain: int = 60) -> None:
        self.env = env
        self.etc = env.root / "etc"
        self.etc.mkdir(exist_ok=True)
        shutil.copy(env.config, self.etc / "worker.conf")
        shutil.copy(env.driver_config, self.etc / "driver.conf")
        self.path = env.root / "init.d" / "djinn-worker-os"
        self.path.parent.mkdir(exist_ok=True)
        shutil.copy(SCRIPT, self.path)
        self.pidfile = env.root / "run" / "djinn-worker-os.pid"
        self.pidfile.parent.mkdir(exist_ok=True)
        self.output = env.root / "djinn-worker-os.out"
        self.defaults = env.root / "default-djinn-worker-os"
        self.defaults.write_text(
            f"DAEMON={shlex.quote(WORKER)}\nDAEMON_USER=root\nDAEMON_GROUP=root\nCONFIG_DIR={self.etc}\n"
            f"PIDFILE={self.pidfile}\nOUTPUT={self.output}\nWORKDIR={env.root / 'work'}\n"
            f"DRAIN_TIMEOUT={drain}\nHANDBACK_TIMEOUT=30\n"
        )

    def __call__(self, action: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(self.path), action],
            env={**os.environ, "DJINN_WORKER_DEFAULTS": str(self.defaults)},
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def cleanup(self) -> None:
        if self.pidfile.exists():
            try:
                os.killpg(self.pid(), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture
def script(worker_env):
    made = []

    def make(**kwargs) -> Script:
        made.append(Script(worker_env, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_sysvinit_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)
    res = subprocess.run(["sh", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sysvinit_start_status_stop(worker_env, script):
    s = script()
    res = s("status")
    assert (res.returncode, res.stdout.strip()) == (3, "djinn-worker (os) is not running")

    res = s("start")
    assert res.returncode == 0, res.stdout + res.stderr + (s.output.read_text() if s.output.exists() else "")
    assert s.pidfile.exists()
    pid = s.pid()
    assert _alive(pid)
    assert str(s.etc / "worker.conf") in Path(f"/proc/{pid}/cmdline").read_text()
    assert "already running" in s("start").stdout
    res = s("status")
    assert (res.returncode, res.stdout.strip()) == (0, f"djinn-worker (os) is running (pid {pid})")

    wait_for(lambda: " ready." in (worker_env.root / "worker.log").read_text(), 60, "the worker to be ready")
    build_id = worker_env.submit(SLOW)
    wait_job_running(worker_env, build_id)
    started = time.monotonic()
    res = s("stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "running builds get 60s to finish" in res.stdout
    # stop returned once the build had finished and the worker was gone.
    assert worker_env.status(build_id)["status"] == "passed"
    assert not _alive(pid)
    assert not s.pidfile.exists()
    assert time.monotonic() - started < 30
    assert s("status").returncode == 3
    assert s("stop").returncode == 0  # stopping a stopped worker is fine


def test_sysvinit_stop_hands_builds_back_after_the_drain_time(worker_env, script):
    s = script(drain=2)
    assert s("start").returncode == 0
    pid = s.pid()
    wait_for(lambda: " ready." in (worker_env.root / "worker.log").read_text(), 60, "the worker to be ready")
    build_id = worker_env.submit(LONG)
    wait_job_running(worker_env, build_id)

    started = time.monotonic()
    res = s("stop")
    took = time.monotonic() - started
    assert res.returncode == 0, res.stdout + res.stderr
    assert 2 <= took < 30, f"stop took {took:.1f}s"
    assert not _alive(pid) and not s.pidfile.exists()
    info = worker_env.status(build_id)
    assert info["status"] == "queued", worker_env.log_tail()
    assert {j["status"] for j in info["jobs"]} == {"queued"}
    assert processes_with("sleep 47.75") == []
    log = (worker_env.root / "worker.log").read_text()
    assert "graceful shutdown" in log and "handed back" in log


def test_sysvinit_force_stop_and_reload(worker_env, script):
    s = script()
    assert s("start").returncode == 0
    wait_for(lambda: " ready." in (worker_env.root / "worker.log").read_text(), 60, "the worker to be ready")
    pid = s.pid()
    (worker_env.root / "worker.log").rename(worker_env.root / "worker.log.1")
    assert s("reload").returncode == 0
    wait_for(lambda: (worker_env.root / "worker.log").exists(), 10, "the log to be reopened")
    assert _alive(pid)

    build_id = worker_env.submit(LONG)
    wait_job_running(worker_env, build_id)
    res = s("force-stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert worker_env.status(build_id)["status"] == "queued"
    assert not s.pidfile.exists()


def test_sysvinit_start_reports_a_worker_that_cannot_start(worker_env, script):
    s = script()
    bad = (s.etc / "worker.conf").read_text().replace(worker_env.redis.addr, "127.0.0.1:1")
    (s.etc / "worker.conf").write_text(bad)
    res = s("start")
    assert res.returncode == 1
    assert "failed to start" in res.stderr and "cannot connect to Redis at 127.0.0.1:1" in res.stderr
    assert not s.pidfile.exists()


# -- Grafana ---------------------------------------------------------------------------

DASHBOARD = ROOT / "dist" / "grafana" / "djinn-workers.json"


def test_grafana_dashboard_is_importable_json():
    """Valid JSON of Grafana's dashboard model; its expressions are checked against /metrics in test_metrics."""
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "job", "instance"]
