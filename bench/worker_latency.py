#!/usr/bin/env python3
"""Submit-to-finished latency and throughput of 1-job `true` builds on the os driver.

Side by side in one run, on the same private Redis broker: a djinn worker
(parallelism 2) running real builds (rows, lease, output, the runner and the os
driver), and a bare Celery worker (concurrency 2) whose task only runs
`subprocess.run(["true"])`. Each side hears of a finished build at once (djinn:
LISTEN djinn_build_finished; bare: its Redis result), so neither pays for polling.
Prints the ratios; the targets (issue 14): latency <= 2x, throughput >= 0.5x.

    .venv/bin/python bench/worker_latency.py [--builds 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from select import select as select_fds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services import PostgresServer, RedisServer  # noqa: E402
from targets import report  # noqa: E402

BIN = Path(sys.executable).parent
MANIFEST = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"
BARE_TASKS = """
import subprocess
from celery import Celery

app = Celery("bare", broker="{broker}", backend="{backend}")
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True


@app.task(name="bare.true")
def run_true():
    subprocess.run(["true"], check=True)
"""


def wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"worker exited: {log.read_text()[-2000:]}")
        if log.exists() and " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    sys.exit("worker not ready")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=40, help="builds per measurement (default 40)")
    parser.add_argument("--rounds", type=int, default=5, help="throughput bursts per side, taken in turns (default 5)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="djinn-bench-"))
    pg, redis = PostgresServer(), RedisServer()
    procs: list[subprocess.Popen] = []
    try:
        pg.start()
        redis.start()
        pg.create_database("bench")
        host, port = pg.addr.split(":")
        config = work / "worker.conf"
        config.write_text(
            textwrap.dedent(
                f"""
                driver "os"
                parallelism 2
                log info "{work}/worker.log"
                database {{
                    addr "{host}:{port}"
                    name "bench"
                    username "postgres"
                }}
                redis {{ addr "{redis.addr}" }}
                store artifacts {{
                    type "file"
                    path "{work}/artifacts"
                }}
                store objects {{
                    type "file"
                    path "{work}/objects"
                }}
                """
            )
        )
        (work / "driver.conf").write_text("driver os {}\n")
        subprocess.run([BIN / "djinn-worker", "migrate", "-config", config], check=True, capture_output=True)

        # The djinn side: submissions through the Python API, completion read from the rows.
        from sqlalchemy import select

        from djinn.db.models import Build
        from djinn.db.recorder import FINISHED_CHANNEL
        from djinn.db.submit import submit
        from djinn.worker.context import WorkerContext
        from djinn.worker.queue import enqueue

        out = work / "djinn.out"
        proc = subprocess.Popen(
            [BIN / "djinn-worker", "-config", config, "-driver", work / "driver.conf"],
            stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(proc)
        wait_ready(work / "worker.log", proc)
        ctx = WorkerContext.from_files(str(config), str(work / "driver.conf"))

        def djinn_submit() -> int:
            return submit(ctx.sessions, MANIFEST, username="bench", enqueue=lambda i, q: enqueue(ctx.app, i, q)).id

        # Finished builds are announced on FINISHED_CHANNEL when their rows commit, as the
        # bare side's results are on Redis: both sides learn of completion without polling.
        pooled = ctx.engine.raw_connection()
        pooled.detach()  # a connection of its own, never handed back to the pool
        listener = pooled.dbapi_connection
        listener.autocommit = True
        listener.cursor().execute(f"LISTEN {FINISHED_CHANNEL}")

        def djinn_wait(ids: list[int]) -> None:
            pending = set(ids)
            while pending:
                if not select_fds([listener], [], [], 5)[0]:
                    with ctx.sessions() as session:  # nothing heard for a while: look at the rows
                        done = session.scalars(
                            select(Build.id).where(Build.id.in_(pending), Build.status.in_(["passed", "failed"]))
                        ).all()
                    pending -= set(done)
                    continue
                listener.poll()
                while listener.notifies:
                    pending.discard(int(listener.notifies.pop(0).payload))

        # The bare side: a Celery task that runs `true`, its result read back from Redis.
        bare_dir = work / "bare"
        bare_dir.mkdir()
        (bare_dir / "bare_tasks.py").write_text(BARE_TASKS.format(broker=redis.url, backend=redis.url.replace("/0", "/1")))
        bare_out = work / "bare.out"
        bare = subprocess.Popen(
            [BIN / "celery", "-A", "bare_tasks", "worker", "-c", "2", "-Q", "bare", "--loglevel", "INFO",
             "--without-mingle", "--without-gossip", "-n", "bare@%h"],
            cwd=bare_dir, stdout=open(bare_out, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(bare)
        wait_ready(bare_out, bare)
        sys.path.insert(0, str(bare_dir))
        import bare_tasks  # noqa: E402

        def bare_submit():
            return bare_tasks.run_true.apply_async(queue="bare")

        def bare_wait(results) -> None:
            for result in results:
                result.get(timeout=60, interval=0.005)

        # Warm both up, then interleave the measurements so noise hits both alike.
        djinn_wait([djinn_submit() for _ in range(2)])
        bare_wait([bare_submit() for _ in range(2)])
        djinn_lat, bare_lat = [], []
        for _ in range(args.builds):
            start = time.perf_counter()
            djinn_wait([djinn_submit()])
            djinn_lat.append(time.perf_counter() - start)
            start = time.perf_counter()
            bare_wait([bare_submit()])
            bare_lat.append(time.perf_counter() - start)

        # Throughput in bursts, one side's then the other's, round after round: a slow
        # stretch of the shared machine then falls on both sides instead of on one burst.
        djinn_time = bare_time = 0.0
        for _ in range(args.rounds):
            start = time.perf_counter()
            djinn_wait([djinn_submit() for _ in range(args.builds)])
            djinn_time += time.perf_counter() - start
            start = time.perf_counter()
            bare_wait([bare_submit() for _ in range(args.builds)])
            bare_time += time.perf_counter() - start
        djinn_tput = args.rounds * args.builds / djinn_time
        bare_tput = args.rounds * args.builds / bare_time
        listener.close()
        ctx.close()
        # Drop the bare side's results while Redis is up: their finalizers talk to it.
        bare_tasks.app.backend.result_consumer.stop()
        gc.collect()
    finally:
        for proc in procs:
            stop(proc)
        pg.close()
        redis.close()
        shutil.rmtree(work, ignore_errors=True)

    dj, ba = statistics.median(djinn_lat), statistics.median(bare_lat)
    print(f"builds per measurement: {args.builds} (throughput: {args.rounds} bursts a side, in turns)")
    print(f"latency (median)  djinn {dj * 1000:7.1f} ms   bare celery {ba * 1000:7.1f} ms   ratio {dj / ba:5.2f}x")
    print(f"throughput        djinn {djinn_tput:7.1f} /s   bare celery {bare_tput:7.1f} /s   ratio {bare_tput / djinn_tput:5.2f}x")
    # Issue 14: latency at most twice a bare Celery task's, throughput at least half of it.
    report([("worker_latency", dj / ba, "<=", 2.0), ("worker_throughput", djinn_tput / bare_tput, ">=", 0.5)])


if __name__ == "__main__":
    main()
