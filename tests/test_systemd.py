"""dist/systemd under a real systemd: a Debian container booted with systemd as PID 1.

The container (scripts/systemd-test-image, built once per machine) shares the host's
network, so the worker in it uses this test's private PostgreSQL and Redis on the
loopback while the test submits builds and reads their status from the host. The
checkout is installed in it from a wheel built here; the unit is copied from dist/.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ops_support import wait_for, wait_job_running

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "dist" / "systemd" / "djinn-worker@.service"
VENV = Path(sys.executable).parent.parent  # the venv running the tests (not resolved: that is its base Python)
LOG = "/var/log/djinn/worker.log"
SERVICE = "djinn-worker@os.service"
QUICK = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['id -un', 'echo built']}\n"
SLOW = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo slow', 'sleep 12', 'echo done']}\n"
_names = itertools.count(1)


def _run(*argv: str, timeout: float = 120, input: str | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return res.stdout


class Container:
    """A booted systemd container; `sh` runs a command in it, `show` reads a unit property."""

    def __init__(self, image: str, mounts: dict[Path, str]) -> None:
        self.name = f"djinn-systemd-{os.getpid()}-{next(_names)}"
        volumes = [arg for host, inside in mounts.items() for arg in ("-v", f"{host}:{inside}:ro")]
        _run(
            "docker", "run", "-d", "--rm", "--name", self.name, "--network", "host",
            "--cap-add", "SYS_ADMIN", "--cgroupns=private",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp", "-e", "container=docker",
            *volumes, image, "/lib/systemd/systemd",
        )

    def sh(self, script: str, timeout: float = 120, input: str | None = None) -> str:
        return _run("docker", "exec", "-i", self.name, "sh", "-ec", script, timeout=timeout, input=input)

    def try_sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "exec", self.name, "sh", "-c", script], capture_output=True, text=True, timeout=60)

    def show(self, prop: str, unit: str = SERVICE) -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}").strip()

    def log(self) -> str:
        return self.try_sh(f"cat {LOG} 2>/dev/null").stdout

    def journal(self) -> str:
        return self.try_sh(f"journalctl -u {SERVICE} --no-pager | tail -n 40").stdout

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def systemd_image() -> str:
    """The image's tag; building it takes minutes the first time on a machine."""
    res = subprocess.run([str(ROOT / "scripts" / "systemd-test-image"), str(VENV)], capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f"scripts/systemd-test-image failed:\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture
def wheel_dir(tmp_path) -> Path:
    out = tmp_path / "wheel"
    _run(str(VENV / "bin" / "pip"), "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT), timeout=300)
    (wheel,) = out.glob("djinn_worker-*.whl")
    return out


@pytest.fixture
def container(systemd_image, wheel_dir):
    box = Container(systemd_image, {wheel_dir: "/mnt/wheel", ROOT / "dist": "/mnt/dist"})
    yield box
    box.remove()


def _container_config(env) -> str:
    """The test's worker config, with the paths the worker has inside the container."""
    text = env.config.read_text()
    for name, inside in (("worker.log", LOG), ("artifacts", "/var/lib/djinn/artifacts"), ("objects", "/var/lib/djinn/objects")):
        text = text.replace(f"{env.root}/{name}", inside)
    assert str(env.root) not in text
    return text


def _wait(box: Container, predicate, timeout: float, what: str) -> None:
    """wait_for, failing with what the unit and the worker said."""
    try:
        wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\njournal:\n{box.journal()}\nworker log:\n{box.log()[-3000:]}") from None


def _main_pid(box: Container) -> int:
    return int(box.show("MainPID"))


def test_unit_runs_drains_reopens_and_restarts_under_systemd(worker_env, container):
    box = container
    wait_for(lambda: box.try_sh("systemctl is-system-running").stdout.strip() in ("running", "degraded"), 90, "systemd to boot")

    # Installed as dist/README says: the program, its user, the config, the unit.
    box.sh("/opt/djinn/bin/pip install -q --no-index --no-deps /mnt/wheel/*.whl", timeout=180)
    box.sh("useradd --system --user-group --home-dir /var/lib/djinn --shell /usr/sbin/nologin djinn")
    box.sh("mkdir -p /etc/djinn && cat > /etc/djinn/worker.conf", input=_container_config(worker_env))
    box.sh("cat > /etc/djinn/driver.conf", input=worker_env.driver_config.read_text())
    box.sh("echo DJINN_WORKER=/opt/djinn/bin/djinn-worker > /etc/default/djinn-worker")
    box.sh("cp /mnt/dist/systemd/djinn-worker@.service /etc/systemd/system/ && systemctl daemon-reload")
    box.sh(f"systemctl enable --now {SERVICE}", timeout=60)
    assert box.sh("systemctl is-enabled djinn-worker@os").strip() == "enabled"
    _wait(box, lambda: " ready." in box.log(), 90, "the worker to be ready")
    pid = _main_pid(box)
    assert "-config /etc/djinn/worker.conf" in box.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline")
    assert box.sh(f"stat -c %U /proc/{pid}").strip() == "djinn"

    # It runs builds, as the unit's user.
    info = worker_env.wait_status(worker_env.submit(QUICK), timeout=90)
    assert info["status"] == "passed", box.log()[-3000:]

    # `systemctl kill -s HUP` (every process of the unit) reopens the log; nothing dies of it.
    box.sh(f"mv {LOG} {LOG}.1")
    box.sh(f"systemctl kill -s HUP {SERVICE}")
    _wait(box, lambda: "log file reopened" in box.log(), 30, "the log to be reopened")
    assert box.show("ActiveState") == "active" and _main_pid(box) == pid
    assert worker_env.wait_status(worker_env.submit(QUICK), timeout=90)["status"] == "passed"
    assert "passed" in box.log()  # the pool processes followed onto the new file
    # `systemctl reload` (ExecReload: the main process only) does the same.
    box.sh(f"mv {LOG} {LOG}.2 && systemctl reload {SERVICE}")
    _wait(box, lambda: "log file reopened" in box.log(), 30, "the log to be reopened by systemctl reload")
    assert _main_pid(box) == pid

    # A killed main process is restarted by Restart=on-failure.
    box.sh(f"systemctl kill -s KILL --kill-whom=main {SERVICE}")
    _wait(box, lambda: box.show("NRestarts") == "1" and box.show("ActiveState") == "active", 90, "the restart")
    restarted = _main_pid(box)
    assert restarted not in (0, pid)
    _wait(box, lambda: " ready." in box.log(), 120, "the restarted worker to be ready")  # the log since the HUP
    assert worker_env.wait_status(worker_env.submit(QUICK), timeout=90)["status"] == "passed"

    # `systemctl stop` lets the running build finish, well within TimeoutStopSec.
    build_id = worker_env.submit(SLOW)
    wait_job_running(worker_env, build_id, timeout=60)
    started = time.monotonic()
    box.sh(f"systemctl stop {SERVICE}", timeout=300)
    took = time.monotonic() - started
    info = worker_env.status(build_id)
    assert info["status"] == "passed", box.log()[-3000:]  # finished before stop returned
    assert took < 120, f"stop took {took:.0f}s"
    assert box.show("ActiveState") == "inactive"
    assert box.show("Result") == "success" and box.show("ExecMainStatus") == "0", box.journal()
    assert box.try_sh("pgrep -u djinn").stdout.strip() == ""  # nothing of the worker is left
    assert "graceful shutdown" in box.log() and "handed back" not in box.log()
