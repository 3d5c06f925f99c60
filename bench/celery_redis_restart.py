"""Does a Celery worker survive a Redis restart? The check behind the celery pin in setup.cfg.

Starts a private redis-server (no persistence), a Celery worker with the broker
settings djinn uses (djinn.queue.celery_settings: acks_late, prefetch 1, no
cancel on connection loss), gives it a task that is running when Redis is
restarted, then sends a second task after the restart. The worker passes when
it is still alive and runs the second task.

    python bench/celery_redis_restart.py [--python PYTHON] [--restarts N] [--down SECONDS] [--setting NAME=VALUE ...]

--python picks the interpreter (and so the Celery version) the worker runs
with, e.g. a scratch venv with `pip install 'celery[redis]==5.7.0'`; the
default is this interpreter. --setting adds a Celery setting to the worker's
app (a Python literal), to try workarounds. Exit 0: survived; 1: it crashed
or stopped consuming (its output is printed).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

APP = """
import os, time
from celery import Celery

app = Celery("restartcheck", broker=os.environ["BROKER"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    broker_transport_options={"visibility_timeout": 3600},
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
)
app.conf.update(EXTRA)


@app.task(name="check.work")
def work(seconds, marker):
    time.sleep(seconds)
    with open(marker, "a") as f:
        f.write("done\\n")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"redis did not listen on {port}")


def start_redis(port: int, directory: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port)
    return proc


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter the worker runs with")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--down", type=float, default=0.0, help="seconds Redis stays down on each restart")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.setting:
        name, _, value = item.partition("=")
        extra[name] = ast.literal_eval(value)

    root = Path(tempfile.mkdtemp(prefix="celery-restart-"))
    port = free_port()
    redis_proc = start_redis(port, root)
    (root / "restartcheck.py").write_text(APP.replace("EXTRA", repr(extra)))
    env = {**os.environ, "BROKER": f"redis://127.0.0.1:{port}/0", "PYTHONPATH": str(root)}
    out = open(root / "worker.out", "wb")
    worker = subprocess.Popen([args.python, "-m", "celery", "-A", "restartcheck", "worker", "-c", "1", "--loglevel", "INFO",
                               "--without-mingle", "--without-gossip"], cwd=root, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    log = lambda: (root / "worker.out").read_text(errors="replace")  # noqa: E731
    marker = root / "marker"
    sender_code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        from restartcheck import work
        work.apply_async(args=[float(sys.argv[1]), {str(marker)!r}], retry=True)
    """)
    send = lambda seconds: subprocess.run([args.python, "-c", sender_code, str(seconds)], env=env, check=True)  # noqa: E731
    ok = False
    try:
        if not wait_for(lambda: " ready." in log(), 60):
            print("worker did not start:\n" + log())
            return 1
        version = subprocess.run([args.python, "-c", "import celery, kombu; print(celery.__version__, kombu.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        print(f"celery/kombu {version}; extra settings {extra or 'none'}")
        for i in range(args.restarts):
            send(3)
            if not wait_for(lambda: "received" in log().split("restart #")[-1], 20):
                print("the task was not received:\n" + log())
                return 1
            with open(root / "worker.out", "ab") as f:
                f.write(f"--- restart #{i + 1} ---\n".encode())
            redis_proc.terminate()
            redis_proc.wait(10)
            time.sleep(args.down)
            redis_proc = start_redis(port, root)
            if not wait_for(lambda: worker.poll() is not None or "Connected to" in log().split("restart #")[-1], 40):
                print("the worker did not reconnect:\n" + log())
                return 1
            if worker.poll() is not None:
                break
        count = marker.read_text().count("done") if marker.exists() else 0
        send(0)
        ok = worker.poll() is None and wait_for(
            lambda: marker.exists() and marker.read_text().count("done") > count, 30
        )
        text = log()
        print(text[-6000:] if not ok or "Traceback" in text else "(no traceback in the worker output)")
        print("RESULT:", "survived" if ok else f"FAILED (worker exit code {worker.poll()})")
        return 0 if ok else 1
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
