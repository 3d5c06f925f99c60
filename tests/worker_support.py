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

import pytest
from services import PostgresServer, RedisServer
from sqlalchemy import create_engine, text

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


@dataclass
class WorkerEnv:
    """One test's worker setup: its own database, Redis, stores and config files."""

    root: Path
    postgres: PostgresServer
    redis: RedisServer
    database: str
    processes: list[subprocess.Popen] = field(default_factory=list)

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
        """Poll until the build reaches one of `statuses` (default: any finished status)."""
        statuses = statuses or ("passed", "passed_with_failures", "failed", "killed", "timed_out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.status(build_id)
            if info["status"] in statuses:
                return info
            time.sleep(0.2)
        raise AssertionError(f"build {build_id} still {info['status']} after {timeout}s; worker log:\n{self.log_tail()}")

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
        engine = create_engine(self.url)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(query), params)
                return result.all() if result.returns_rows else None
        finally:
            engine.dispose()


@pytest.fixture
def worker_env(tmp_path, postgres, redis_server):
    database = f"djinn_test_{os.getpid()}_{next(_databases)}"
    postgres.create_database(database)
    env = WorkerEnv(tmp_path, postgres, redis_server, database)
    env.write_config()
    env.cli("migrate")
    yield env
    env.stop_all()
