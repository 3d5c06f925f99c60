"""Running real worker processes against the tests' private PostgreSQL and Redis."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from services import PostgresServer, RedisServer
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

BIN = os.path.dirname(sys.executable)
WORKER = shutil.which("djinn-worker", path=BIN) or "djinn-worker"
CELERY = shutil.which("celery", path=BIN) or "celery"
_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.close()


def _python_pids_in_group(pgid: int) -> list[int]:
    """The Python processes of a worker's process group (not its builds' shells or VMs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and "python" in os.readlink(entry / "exe"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@dataclass
class WorkerEnv:
    """One test's worker setup: its own database, Redis, stores and config files."""

    root: Path
    postgres: PostgresServer
    redis: RedisServer
    database: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    _engine: Any = field(default=None, repr=False)

    @property
    def config(self) -> Path:
        return self.root / "worker.conf"

    @property
    def driver_config(self) -> Path:
        return self.root / "driver.conf"

    driver: str = "os"

    def write_config(
        self,
        *,
        timeout: str = "5m",
        orphan_timeout: str = "4s",
        parallelism: int = 2,
        extra: str = "",
        driver: str | None = None,
        driver_config: str | None = None,
    ) -> None:
        """The worker config (and, with `driver_config`, the driver config) for this test."""
        self.driver = driver or self.driver
        pg_host, pg_port = self.postgres.addr.split(":")
        self.config.write_text(
            f"""
driver "{self.driver}"
parallelism {parallelism}
timeout {timeout}
orphan_timeout {orphan_timeout}
log info "{self.root}/worker.log"
crypto {{
    block "0123456789abcdef0123456789abcdef"
    salt  "test-salt"
}}
database {{
    addr     "{pg_host}:{pg_port}"
    name     "{self.database}"
    username "postgres"
}}
redis {{
    addr "{self.redis.addr}"
}}
store artifacts {{
    type  "file"
    path  "{self.root}/artifacts"
    limit 1MB
}}
store objects {{
    type "file"
    path "{self.root}/objects"
}}
{extra}
"""
        )
        if driver_config is not None or not self.driver_config.exists():
            self.driver_config.write_text(driver_config or "driver os {}\n")

    @property
    def url(self) -> str:
        return self.postgres.url(self.database)

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command, rest = args[0], args[1:]
        res = subprocess.run(
            [WORKER, command, "-config", str(self.config), *rest], capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise AssertionError(f"djinn-worker {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res

    def submit(self, manifest: str, *args: str) -> int:
        path = self.root / f"manifest-{time.monotonic_ns()}.yml"
        path.write_text(manifest)
        return json.loads(self.cli("submit", str(path), "-json", *args).stdout)["id"]

    def status(self, build_id: int) -> dict:
        return json.loads(self.cli("status", str(build_id), "-json").stdout)

    def wait_status(self, build_id: int, statuses: tuple[str, ...] | None = None, timeout: float = 60) -> dict:
        """Wait until the build reaches one of `statuses` (default: any finished status); its `status -json`.

        The waiting reads the build's row directly: a `status` command costs a
        second and more of CPU, and polling with it would starve the worker under
        test on a small machine. The command runs once, for what is returned.
        """
        statuses = statuses or ("passed", "passed_with_failures", "failed", "killed", "timed_out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.build_status(build_id) in statuses:
                info = self.status(build_id)
                if info["status"] in statuses:
                    return info
            if self.processes and all(proc.poll() is not None for proc in self.processes):
                raise AssertionError(
                    f"build {build_id} still {self.build_status(build_id)} and no worker runs any more "
                    f"(exit {[proc.returncode for proc in self.processes]}); worker log:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        jobs = self.sql("SELECT name, status FROM build_jobs WHERE build_id = :id ORDER BY id", id=build_id)
        raise AssertionError(
            f"build {build_id} still {self.build_status(build_id)} after {timeout}s; jobs: {[tuple(j) for j in jobs]}"
            f"\nworker log:\n{self.log_tail()}\nstacks:\n{self.stacks()}"
        )

    def build_status(self, build_id: int) -> str | None:
        """The build's status as stored now; None while PostgreSQL cannot be reached (a test may restart it)."""
        try:
            rows = self.sql("SELECT status FROM builds WHERE id = :id", id=build_id)
        except OperationalError:
            return None
        return str(rows[0][0]) if rows else None

    def stacks(self) -> str:
        """Every thread's stack in each Python process of the running workers (SIGUSR2, djinn.observe.logs)."""
        outs = sorted(self.root.glob("*.out"))
        sizes = {path: path.stat().st_size for path in outs}
        asked = 0
        for proc in self.processes:
            if proc.poll() is not None:
                continue
            for pid in _python_pids_in_group(proc.pid):
                try:
                    os.kill(pid, signal.SIGUSR2)
                    asked += 1
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        written = lambda: sum(path.read_bytes()[sizes[path]:].count(b"most recent call first") for path in outs)  # noqa: E731
        while time.monotonic() < deadline and written() < asked:
            time.sleep(0.1)
        time.sleep(0.3)  # a process's later threads follow its first one
        return "\n".join(path.read_bytes()[sizes[path]:].decode(errors="replace") for path in outs) or "(none written)"

    def broker_idle(self, task: str | None = None) -> bool:
        """No task message (of `task`, if named) waits on the broker or is held unacknowledged: every one sent is done.

        Every djinn task acknowledges its message only when it is over (acks_late), and a
        retry is published before the message it retries is acknowledged, so the broker
        is never idle while a task, or its retry, is still to run. A killed worker's
        message stays unacknowledged until its visibility timeout: name the task to wait on.
        """
        client = redis.Redis(host="127.0.0.1", port=self.redis.port)
        try:
            messages = list(client.hvals("unacked"))
            messages += [m for key in client.scan_iter(_type="list") for m in client.lrange(key, 0, -1)]
        finally:
            client.close()
        return not any(task is None or task.encode() in message for message in messages)

    def notifications_settled(self) -> bool:
        """No commit status or webhook delivery is pending or being sent (djinn.notify.outbox): none will be sent any more."""
        return self.sql("SELECT count(*) FROM notification_outbox WHERE state IN ('pending', 'sending')") == [(0,)]

    def log_tail(self, n: int = 60) -> str:
        path = self.root / "worker.log"
        text_ = path.read_text(errors="replace") if path.exists() else "(no log)"
        return "\n".join(text_.splitlines()[-n:])

    def start_worker(self, *, celery: bool = False, name: str = "w") -> subprocess.Popen:
        """A worker in its own process group (so a test can SIGKILL the whole group)."""
        env = {**os.environ, "DJINN_WORKER_CONFIG": str(self.config), "DJINN_DRIVER_CONFIG": str(self.driver_config)}
        if celery:
            from djinn.config import queue_for_driver

            argv = [CELERY, "-A", "djinn", "worker", "-Q", queue_for_driver(self.driver), "-c", "2", "--loglevel", "INFO",
                    "-n", f"{name}-{time.monotonic_ns()}@%h", "--without-mingle", "--without-gossip"]
        else:
            argv = [WORKER, "-config", str(self.config), "-driver", str(self.driver_config)]
        sources = [self.root / f"{name}.out", self.root / "worker.log"]
        offsets = {path: path.stat().st_size if path.exists() else 0 for path in sources}
        log = open(self.root / f"{name}.out", "ab")
        proc = subprocess.Popen(argv, cwd="/", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        self._wait_ready(proc, name, offsets)
        return proc

    def _wait_ready(self, proc: subprocess.Popen, name: str, offsets: dict[Path, int], timeout: float = 60) -> None:
        """Wait for Celery's "ready." line written after `offsets` (earlier ones are other workers')."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{(self.root / f'{name}.out').read_text()}")
            for path, offset in offsets.items():
                if path.exists():
                    with open(path, "rb") as f:
                        f.seek(offset)
                        if b" ready." in f.read():
                            return
            time.sleep(0.1)
        raise AssertionError(f"worker {name} not ready after {timeout}s")

    def kill_group(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(10)

    def sql(self, query: str, **params):
        """One statement in its own connection (none is kept: a test may restart PostgreSQL between two)."""
        if self._engine is None:
            self._engine = create_engine(self.url, poolclass=NullPool)
        with self._engine.begin() as conn:
            result = conn.execute(text(query), params)
            return result.all() if result.returns_rows else None


@pytest.fixture(scope="session")
def migrated_template(postgres, tmp_path_factory) -> str:
    """A database `djinn-worker migrate` made once: each test's database is a copy (CREATE DATABASE ... TEMPLATE).

    Copying takes milliseconds where migrating takes seconds of CPU; the tests of
    `migrate` itself run it on databases of their own.
    """
    name = f"djinn_template_{os.getpid()}"
    postgres.create_database(name)
    no_redis = SimpleNamespace(addr="127.0.0.1:1")  # `migrate` reads the config's Redis address, never connects
    env = WorkerEnv(tmp_path_factory.mktemp("template"), postgres, no_redis, name)
    env.write_config()
    env.cli("migrate")
    return name


@pytest.fixture
def worker_env(tmp_path, postgres, redis_server, migrated_template):
    database = f"djinn_test_{os.getpid()}_{next(_databases)}"
    postgres.create_database(database, template=migrated_template)
    env = WorkerEnv(tmp_path, postgres, redis_server, database)
    env.write_config()
    yield env
    env.stop_all()
