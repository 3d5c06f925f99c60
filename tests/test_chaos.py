"""Nothing lost, nothing run twice: real workers under SIGKILL, SIGSTOP, and PostgreSQL and Redis restarts.

Every job here appends lines to a marker file outside its build directory, so a
second run of a job is visible even when the database was reset in between.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ops_support import alive, process_tree
from waiting import wait_for

from djinn.config import DriverConfig, load_worker_config
from djinn.db.submit import submit
from djinn.runner.engine import Variable
from djinn.worker.context import WorkerContext
from djinn.worker.queue import enqueue

FINAL = ("passed", "passed_with_failures", "failed", "killed", "timed_out")


# -- process trees ---------------------------------------------------------------


def freeze_tree(root: int) -> set[int]:
    """SIGSTOP `root` and every descendant, again until no new process appears; returns the pids."""
    stopped: set[int] = set()
    while True:
        fresh = [pid for pid in process_tree(root) if pid not in stopped]
        if not fresh:
            return stopped
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
            except ProcessLookupError:
                pass


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass





def context_for(worker_env) -> WorkerContext:
    return WorkerContext(load_worker_config(str(worker_env.config)), DriverConfig.defaults(), name="test")


def read_marks(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def worker_pid(worker: str | None) -> int | None:
    return int(worker.rsplit(":", 1)[1]) if worker else None


# -- a worker frozen past orphan_timeout ------------------------------------------------

TICKING = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands:
      - run="$$"
      - echo "run $run"
      - i=0; while [ $i -lt 60 ]; do echo "$run $(date +%s.%N)" >> "$MARK"; i=$((i+1)); sleep 0.1; done
"""


def test_frozen_worker_stops_at_once_when_resumed_and_writes_nothing_more(worker_env):
    worker_env.write_config(orphan_timeout="4s")
    workers = [worker_env.start_worker(name="first"), worker_env.start_worker(name="second")]
    marker = worker_env.root / "ticks.txt"
    build_id = worker_env.submit(TICKING, "-env", f"MARK={marker}")
    wait_for(lambda: len(read_marks(marker)) >= 3, 60, "the job writes its marker")
    ((worker, attempt),) = worker_env.sql("SELECT worker, attempt FROM builds WHERE id = :id", id=build_id)
    assert attempt == 1
    owner = next(p for p in workers if worker_pid(worker) in process_tree(p.pid))
    old_run = read_marks(marker)[0][0]

    frozen = freeze_tree(owner.pid)
    try:
        # Another worker's reaper sees the stale lease and its run starts.
        wait_for(lambda: {m[0] for m in read_marks(marker)} - {old_run}, 60, "the build runs again elsewhere")
        assert worker_env.sql("SELECT attempt FROM builds WHERE id = :id", id=build_id) == [(2,)]
    finally:
        resumed = time.time()
        signal_all(frozen, signal.SIGCONT)
    old_job = int(old_run)
    wait_for(lambda: not alive(old_job), 5, "the old job stops after the resume")
    stopped_within = time.time() - resumed

    info = worker_env.wait_status(build_id, timeout=60)
    marks = read_marks(marker)
    old = [float(t) for run, t in marks if run == old_run]
    new_runs = {run for run, _ in marks} - {old_run}
    assert len(new_runs) == 1, marks
    (new_run,) = new_runs
    assert stopped_within < 1.0, f"the old job ran {stopped_within:.2f}s after the resume"
    assert max(old) < resumed + 1.0, "the old job wrote after the resume"
    assert len([1 for run, _ in marks if run == new_run]) == 60  # the new run went to its end
    assert info["status"] == "passed", worker_env.log_tail()
    ((output, attempt),) = worker_env.sql("SELECT output, attempt FROM builds WHERE id = :id", id=build_id)
    assert attempt == 2
    assert f"run {new_run}" in output and f"run {old_run}" not in output  # the final rows are the new run's
    assert "lease" in worker_env.log_tail(200)


# -- PostgreSQL down when the build is delivered ------------------------------------------

ONCE = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ['echo "ran $$" >> "$MARK"']
"""


def test_build_delivered_while_postgres_is_down_runs_once_it_is_back(worker_env, postgres, redis_server):
    import redis

    from djinn.worker.reaper import in_broker

    worker_env.start_worker()
    ctx = context_for(worker_env)
    marker = worker_env.root / "once.txt"
    submitted = submit(ctx.sessions, ONCE, username="pg", variables=[Variable("MARK", str(marker))], enqueue=lambda *_: None)
    ctx.close()
    log = worker_env.root / "worker.log"
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    postgres.stop()
    try:
        enqueue(ctx.app, submitted.id, submitted.queue)
        wait_for(lambda: f"build {submitted.id}: claim: PostgreSQL unreachable" in log.read_text(), 60, "the claim fails")
        # Past the claim's patience (10 s here) the message goes back to the queue, not acknowledged as done.
        wait_for(lambda: "its message goes back to the queue" in log.read_text(), 60, "the message is rejected")
        # Seen waiting or delivered again: between a consumer's BRPOP and its note in the unacked
        # hash the message is in that consumer's memory only, so one look may miss it.
        wait_for(lambda: submitted.id in in_broker(client, ["builds_os"], 60), 10, "the message in the broker (was it lost?)")
    finally:
        postgres.start()
        client.close()
    info = worker_env.wait_status(submitted.id, timeout=90)
    assert info["status"] == "passed", worker_env.log_tail()
    assert len(read_marks(marker)) == 1
    assert worker_env.sql("SELECT attempt FROM builds WHERE id = :id", id=submitted.id) == [(1,)]


# -- Redis restarted without persistence ---------------------------------------------------


def _take_and_die(redis_url: str) -> None:
    """A consumer that takes the first build message off builds_os and dies (SIGKILL) before acknowledging it."""
    code = (
        "import sys, time\n"
        "from kombu import Connection\n"
        f"with Connection({redis_url!r}) as conn:\n"
        "    queue = conn.SimpleQueue('builds_os', no_ack=False)\n"
        "    queue.get(timeout=30)\n"
        "    print('taken', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "taken"
    finally:
        proc.kill()
        proc.wait(10)


def test_queued_builds_survive_redis_lost_and_a_backlog_gets_no_duplicates(worker_env, redis_server):
    import redis

    from djinn.worker.reaper import reconcile

    def waiting() -> int:
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)  # a new one: Redis restarts below
        try:
            return client.llen("builds_os")
        finally:
            client.close()

    marks = worker_env.root / "marks"
    marks.mkdir()
    ids = [worker_env.submit(ONCE, "-env", f"MARK={marks}/{i}") for i in range(4)]
    ctx = context_for(worker_env)
    try:
        wait_for(
            lambda: worker_env.sql(
                "SELECT count(*) FROM builds WHERE created_at < now() - interval '4 seconds'"
            )[0][0] == len(ids),
            30, "the builds are older than orphan_timeout",
        )
        # A backlog whose messages are all waiting gets nothing added.
        assert waiting() == 4
        assert reconcile(ctx) == []
        assert waiting() == 4

        # Redis restarted empty: every queued build is queued again, once.
        redis_server.restart()
        assert waiting() == 0
        assert sorted(reconcile(ctx)) == ids
        assert waiting() == 4
        assert reconcile(ctx) == []
        assert waiting() == 4

        # A consumer that took a message and died: the build is queued again once that delivery is old.
        _take_and_die(redis_server.url)
        assert waiting() == 3
        assert reconcile(ctx) == []  # delivered moments ago: its consumer may still claim it
        wait_for(lambda: reconcile(ctx), 30, "the dead consumer's build is queued again", interval=0.5)
        assert waiting() == 4
    finally:
        ctx.close()

    worker_env.start_worker()
    for build_id in ids:
        assert worker_env.wait_status(build_id, timeout=60)["status"] == "passed", worker_env.log_tail()
    assert [len(read_marks(marks / str(i))) for i in range(4)] == [1, 1, 1, 1]


def test_worker_requeues_builds_lost_with_redis_by_itself(worker_env, redis_server):
    marks = worker_env.root / "marks"
    marks.mkdir()
    ids = [worker_env.submit(ONCE, "-env", f"MARK={marks}/{i}") for i in range(3)]
    redis_server.restart()  # no persistence: the messages are gone
    worker_env.start_worker()
    for build_id in ids:
        assert worker_env.wait_status(build_id, timeout=90)["status"] == "passed", worker_env.log_tail()
    assert [len(read_marks(marks / str(i))) for i in range(3)] == [1, 1, 1]
    assert "had no message in the broker" in worker_env.log_tail(200)


# -- chaos ---------------------------------------------------------------------------

CHAOS_JOB = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands:
      - run="$$"
      - echo "run $run"
      - echo "start $run $PPID $(date +%s.%N)" >> "$MARK"
      - sleep 1
      - echo "end $run $PPID $(date +%s.%N)" >> "$MARK"
"""


@dataclass
class Kill:
    at: float  # wall clock, after the tree was frozen
    pids: set[int]
    builds: set[int]  # running on the killed tree when it was frozen


@dataclass
class Chaos:
    env: object
    seconds: float
    builds: int
    rng: random.Random
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    submitted: dict[int, Path] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def submit_one(self, ctx: WorkerContext, i: int) -> None:
        """Submit build number `i`, retrying while PostgreSQL or Redis is away."""
        path = self.env.root / "marks" / f"{i}.txt"
        while True:
            try:
                done = submit(
                    ctx.sessions, CHAOS_JOB, username="chaos", variables=[Variable("MARK", str(path))],
                    enqueue=lambda build_id, queue: enqueue(ctx.app, build_id, queue),
                )
                self.submitted[done.id] = path
                return
            except Exception as exc:  # a service is restarting: try again
                self.events.append(f"submit {i} retried: {exc}")
                time.sleep(0.5)

    def submitter(self, ctx: WorkerContext, numbers: range, until: float) -> None:
        """Submit builds `numbers` spread until `until`."""
        for left, i in zip(range(len(numbers), 0, -1), numbers, strict=True):
            due = time.monotonic() + (until - time.monotonic()) / left
            self.submit_one(ctx, i)
            time.sleep(max(due - time.monotonic(), 0))

    def kill_one(self) -> None:
        name = self.rng.choice(sorted(self.workers))
        proc = self.workers[name]
        pids = freeze_tree(proc.pid)
        time.sleep(0.3)  # a COMMIT sent just before the freeze is in by now
        running = self.env.sql("SELECT id, worker FROM builds WHERE status = 'running'")
        builds = {build_id for build_id, worker in running if worker_pid(worker) in pids}
        signal_all(pids, signal.SIGKILL)
        proc.wait(30)
        self.kills.append(Kill(time.time(), pids, builds))
        self.events.append(f"killed {name} running {sorted(builds)}")
        self.workers[name] = self.env.start_worker(name=name)


def test_chaos_kills_and_restarts_lose_nothing_and_run_nothing_twice(worker_env, postgres, redis_server):
    seconds = float(os.environ.get("DJINN_CHAOS_SECONDS", "150"))
    builds = int(os.environ.get("DJINN_CHAOS_BUILDS", "100"))
    seed = int(os.environ.get("DJINN_CHAOS_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    worker_env.write_config(orphan_timeout="8s")
    (worker_env.root / "marks").mkdir()
    chaos = Chaos(worker_env, seconds, builds, rng)
    for i in range(3):
        chaos.workers[f"w{i}"] = worker_env.start_worker(name=f"w{i}")
    ctx = context_for(worker_env)
    # Most builds spread over the run; a burst just before Redis restarts, so some are waiting then.
    burst = range(builds - min(12, builds // 4), builds)
    start = time.monotonic()
    feeder = threading.Thread(target=chaos.submitter, args=(ctx, range(burst.start), start + seconds * 0.7), daemon=True)
    feeder.start()

    kills = max(3, int(seconds / 25))
    plan = [(rng.uniform(0.05, 0.85) * seconds, "kill") for _ in range(kills)]
    plan += [(0.3 * seconds, "redis"), (0.55 * seconds, "postgres")]
    try:
        for at, what in sorted(plan):
            time.sleep(max(start + at - time.monotonic(), 0))
            if what == "kill":
                chaos.kill_one()
            elif what == "redis":
                for i in burst:
                    chaos.submit_one(ctx, i)
                waiting = worker_env.sql("SELECT count(*) FROM builds WHERE status = 'queued'")[0][0]
                redis_server.restart()  # `--save "" --appendonly no`: every message is lost
                chaos.events.append(f"redis restarted empty with {waiting} builds queued")
            else:
                postgres.stop()
                time.sleep(5)
                postgres.start()
                chaos.events.append("postgres restarted")
        feeder.join(seconds * 2)
        assert not feeder.is_alive(), "submissions did not finish"
        time.sleep(max(start + seconds - time.monotonic(), 0))

        def all_final():
            rows = worker_env.sql("SELECT count(*) FROM builds WHERE status IN ('queued', 'running')")
            return rows[0][0] == 0

        try:
            wait_for(all_final, 120, "every build final", interval=1)
        except AssertionError:
            stuck = worker_env.sql("SELECT id, status, attempt, worker FROM builds WHERE status IN ('queued', 'running')")
            raise AssertionError(f"builds lost (seed {seed}): {stuck}\n{chaos.events}\n{worker_env.log_tail(80)}") from None
    finally:
        ctx.close()

    rows = worker_env.sql("SELECT id, status, attempt, error, output FROM builds ORDER BY id")
    assert len(rows) == builds == len(chaos.submitted)
    killed_pids = set().union(*(k.pids for k in chaos.kills)) if chaos.kills else set()
    problems = []
    for build_id, status, attempt, error, output in rows:
        killed = [k for k in chaos.kills if build_id in k.builds]
        runs: dict[str, dict] = {}
        for kind, run, ppid, at in read_marks(chaos.submitted[build_id]):
            runs.setdefault(run, {"ppid": int(ppid)})[kind] = float(at)
        order = sorted(runs.values(), key=lambda r: r["start"])
        # Never two runs at once: each earlier run ended (or its tree was killed) before the next started.
        for earlier, later in zip(order, order[1:], strict=False):
            ended = earlier.get("end") or min((k.at for k in chaos.kills if earlier["ppid"] in k.pids), default=None)
            if ended is None or ended >= later["start"]:
                problems.append(f"build {build_id}: runs overlap: {order}")
        # A job runs again only when the run before it was killed before its final write.
        for earlier in order[:-1]:
            if earlier["ppid"] not in killed_pids:
                problems.append(f"build {build_id}: rerun though the run before was not killed: {order}")
        if status == "passed":
            last = next(run for run, r in runs.items() if r is order[-1]) if order else None
            if not order or "end" not in order[-1]:
                problems.append(f"build {build_id}: passed without a complete run: {order}")
            elif f"run {last}" not in output or any(f"run {run}" in output for run in runs if run != last):
                problems.append(f"build {build_id}: the final rows are not the last run's")
            if attempt - 1 > len(killed):
                problems.append(f"build {build_id}: {attempt} attempts but killed {len(killed)} times")
        elif status == "failed" and error and "started 3 times" in error:
            if len(killed) < 3:
                problems.append(f"build {build_id}: given up after {len(killed)} kills: {error}")
        else:
            problems.append(f"build {build_id}: ended {status} ({error})")
    assert not problems, f"seed {seed}:\n" + "\n".join(problems) + "\n" + "\n".join(chaos.events)
    assert len(chaos.kills) == kills
