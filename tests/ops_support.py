"""Helpers (no fixtures) for the operations tests: signals, waiting, scraping."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

from waiting import wait_for  # noqa: F401  (tests import it from here too)


def job_status(env, build_id: int, job: str) -> str | None:
    """Read from the database directly: a `status` command takes seconds on a loaded machine, a short job can run in between."""
    rows = env.sql("SELECT status FROM build_jobs WHERE build_id = :build AND name = :job", build=build_id, job=job)
    return str(rows[0][0]) if rows else None


def wait_job_running(env, build_id: int, job: str = "a.1", timeout: float = 30.0) -> None:
    wait_for(lambda: job_status(env, build_id, job) == "running", timeout, f"job {job} of build {build_id} to run")


def wait_exit(proc: subprocess.Popen, timeout: float, env=None) -> int:
    """The exit status of a worker that must stop by itself within `timeout` seconds.

    With the test's WorkerEnv, a worker still running then is shown: its log's tail
    and every thread's stack, so a failure says where it waits.
    """
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        shown = f"; worker log:\n{env.log_tail()}\nstacks:\n{env.stacks()}" if env is not None else ""
        raise AssertionError(f"worker {proc.pid} still running {timeout}s after being asked to stop{shown}") from None


def main_signal(proc: subprocess.Popen, sig: int) -> None:
    """A signal to the worker's main process only, as systemd (KillMode=mixed) and start-stop-daemon send it."""
    os.kill(proc.pid, sig)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the worker's /metrics as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    code, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def health(port: int) -> tuple[int, dict]:
    code, body = http_get(f"http://127.0.0.1:{port}/healthz")
    return code, json.loads(body)


def processes_with(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (to prove nothing of a build survived)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (the os driver's jobs run in sessions of their own, still below it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found
