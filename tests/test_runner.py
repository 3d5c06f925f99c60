"""The runner engine driving real /bin/sh processes through the os driver."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from runner_support import SECRET_COMMANDS, SECRET_VALUE, assert_no_secret, runner_for

from djinn.drivers import os as os_driver
from djinn.drivers.os import OSDriver, _PidClock
from djinn.drivers.scratch import SCRATCH
from djinn.manifest import parse_manifest
from djinn.plan import plan_build
from djinn.runner.engine import Key, Reporter, Reporters, Runner, Variable
from djinn.runner.output import Masker
from djinn.status import Status


def make_runner(manifest: str, reporter, tmp_path: Path, **kwargs) -> tuple[Runner, OSDriver]:
    return runner_for(manifest, lambda m: OSDriver(), reporter, tmp_path, **kwargs)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


MULTI = """
driver: {type: os}
env:
  - SPACED=hello big world
  - EQUALS=a=b=c
stages: [build, test]
jobs:
  - stage: build
    commands:
      - echo "$SPACED|$EQUALS" > shared.txt
  - stage: test
    commands:
      - cat shared.txt
"""


def test_passing_multi_stage_build(reporter, tmp_path):
    runner, driver = make_runner(MULTI, reporter, tmp_path)
    assert runner.run() is Status.PASSED
    assert reporter.statuses == {"create-driver": "passed", "build.1": "passed", "test.1": "passed"}
    assert [e[1] for e in reporter.events if e[0] == "job_started"] == ["create-driver", "build.1", "test.1"]
    # set -x traces each command, and env values keep their spaces and '='.
    assert "+ cat shared.txt\nhello big world|a=b=c\n" in reporter.text("test.1")
    assert reporter.events[-1] == ("build_finished", Status.PASSED)
    assert driver.root is None  # the build directory is gone


FAILING = """
driver: {type: os}
stages: [one, two]
jobs:
  - stage: one
    commands: ["echo before", "exit 3", "echo never"]
    artifacts: [report.txt]
  - stage: one
    commands: ["echo should not run"]
  - stage: two
    commands: ["echo should not run"]
"""


def test_failing_job_stops_build_and_artifacts_still_collected(reporter, tmp_path):
    manifest = FAILING.replace('"echo before"', '"echo partial > report.txt"')
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.FAILED
    assert reporter.statuses["one.1"] is Status.FAILED
    assert "never" not in reporter.text("one.1")
    # Jobs that never ran are finished with the build's final status.
    assert reporter.statuses["one.2"] is Status.FAILED and reporter.ran["one.2"] is False
    assert reporter.statuses["two.1"] is Status.FAILED and reporter.ran["two.1"] is False
    assert "should not run" not in "".join(reporter.text(j) for j in reporter.output)
    assert (tmp_path / "artifacts" / "report.txt").read_text() == "partial\n"
    ((job, source, stored),) = reporter.artifacts
    assert (job, source, stored.size) == ("one.1", "report.txt", 8)


def test_allow_failures_gives_passed_with_failures(reporter, tmp_path):
    manifest = """
driver: {type: os}
stages: [build, lint]
allow_failures: [lint]
jobs:
  - {stage: lint, commands: ["false"]}
  - {stage: lint, commands: ["echo lint goes on"]}
  - {stage: build, commands: ['true']}
"""
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.PASSED_WITH_FAILURES
    assert reporter.statuses["lint.1"] is Status.PASSED_WITH_FAILURES
    assert reporter.statuses["lint.2"] is Status.PASSED
    assert "lint goes on" in reporter.text("lint.2")


def test_objects_placed(reporter, tmp_path):
    (tmp_path / "objects" / "sub").mkdir(parents=True)
    (tmp_path / "objects" / "sub" / "data.bin").write_bytes(b"\x00\x01object")
    manifest = """
driver: {type: os}
objects: ["sub/data.bin => in/place.bin"]
stages: [a]
jobs:
  - {stage: a, commands: ["od -c in/place.bin | head -1"]}
"""
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.PASSED
    assert "Placed object sub/data.bin => in/place.bin" in reporter.text("create-driver")
    assert "o   b   j   e   c   t" in reporter.text("a.1")


def test_missing_object_fails_in_setup(reporter, tmp_path):
    manifest = "driver: {type: os}\nobjects: [absent.txt]\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.FAILED
    assert reporter.statuses["create-driver"] is Status.FAILED
    assert "object 'absent.txt' not found" in reporter.text("create-driver")
    assert reporter.ran["a.1"] is False


def test_masked_value_split_across_writes(reporter, tmp_path):
    manifest = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands:
      - set +x
      - printf 'token=%s' "${TOKEN%%-*}"; sleep 0.5; printf -- '-%s done\\n' "${TOKEN#*-}"
      - set -x
      - echo "$TOKEN"
"""
    variables = [Variable("TOKEN", "s3cret-value", masked=True)]
    runner, _ = make_runner(manifest, reporter, tmp_path, variables=variables)
    assert runner.run() is Status.PASSED
    out = reporter.text("a.1")
    assert "s3cret" not in out
    assert "token=xxxxxx done" in out
    assert out.count("xxxxxx") == 3  # the split write, the echo, and its set -x trace


def test_masker_unit_split_and_nul():
    m = Masker(["hunter2"])
    out = m.feed(b"pw: hun") + m.feed(b"te") + m.feed(b"r2\x00 hunt") + m.flush()
    assert out == b"pw: xxxxxxNUL hunt"


def test_nul_bytes_replaced(reporter, tmp_path):
    manifest = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: [\"printf 'a\\\\000b'\"]}\n"
    runner, _ = make_runner(manifest, reporter, tmp_path)
    runner.run()
    assert "aNULb" in reporter.text("a.1")


SLEEPER = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands:
      - sleep 600 & echo $! > child.pid
      - echo $$ > shell.pid
      - echo started
      - sleep 600
  - stage: a
    commands: ["echo never"]
"""


def _pids_from_output(reporter) -> list[int]:
    return [int(line) for line in reporter.text("a.1").splitlines() if line.isdigit()]


def test_timeout_gives_timed_out_and_leaves_no_process(reporter, tmp_path):
    manifest = SLEEPER.replace("- echo started", "- cat child.pid shell.pid")
    runner, driver = make_runner(manifest, reporter, tmp_path, timeout=1.5)
    started = time.monotonic()
    assert runner.run() is Status.TIMED_OUT
    assert time.monotonic() - started < 10
    assert reporter.statuses["a.1"] is Status.TIMED_OUT
    assert reporter.statuses["a.2"] is Status.TIMED_OUT and reporter.ran["a.2"] is False
    pids = _pids_from_output(reporter)
    assert len(pids) == 2
    assert not any(pid_alive(p) for p in pids)  # killed before the run returned
    assert driver.root is None


def test_cancel_gives_killed(reporter, tmp_path):
    manifest = SLEEPER.replace("- echo started", "- cat child.pid shell.pid")
    runner, _ = make_runner(manifest, reporter, tmp_path)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    deadline = time.monotonic() + 10
    while len(_pids_from_output(reporter)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.cancel()
    thread.join(10)
    assert result == [Status.KILLED]
    assert reporter.statuses["a.1"] is Status.KILLED
    assert reporter.final is Status.KILLED
    assert not any(pid_alive(p) for p in _pids_from_output(reporter))


def test_background_process_does_not_hang_job(reporter, tmp_path):
    manifest = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 600 &', 'echo done']}\n"
    runner, _ = make_runner(manifest, reporter, tmp_path)
    started = time.monotonic()
    assert runner.run() is Status.PASSED
    assert time.monotonic() - started < 8


def test_artifact_escaping_build_dir_is_refused(reporter, tmp_path):
    manifest = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ["echo secret > ../x", "ln -s /etc/passwd link"]
    artifacts: ["../x", "link", "/etc/hostname"]
"""
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.PASSED
    out = reporter.text("a.1")
    assert "artifact ../x: artifact source '../x' leaves the build directory" in out
    assert "artifact link: artifact source 'link' leaves the build directory" in out
    assert "artifact /etc/hostname: artifact source '/etc/hostname' leaves the build directory" in out
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_glob_artifacts(reporter, tmp_path):
    manifest = """
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ["mkdir out", "echo 1 > out/a.log", "echo 22 > out/b.log"]
    artifacts: ["out/*.log => logs-*"]
"""
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.PASSED
    assert (tmp_path / "artifacts" / "logs-a.log").read_text() == "1\n"
    assert (tmp_path / "artifacts" / "logs-b.log").read_text() == "22\n"


def test_object_destination_escaping_is_refused(reporter, tmp_path):
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "f").write_text("x")
    manifest = "driver: {type: os}\nobjects: ['f => ../../evil']\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.FAILED
    assert "leaves the build directory" in reporter.text("create-driver")


class SlowCreateDriver(OSDriver):
    """An os driver whose creation never finishes until cancelled, to exercise the creation limit."""

    def create(self, env, log):
        super().create(env, log)
        self._woken = threading.Event()
        self._woken.wait(30)

    def cancel(self):
        super().cancel()
        if hasattr(self, "_woken"):
            self._woken.set()


def test_driver_creation_limit_fails_build(reporter, tmp_path):
    m = parse_manifest("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n")
    runner = Runner(plan_build(m), SlowCreateDriver(), reporter=reporter, create_timeout=0.5)
    assert runner.run() is Status.FAILED
    assert "driver creation did not finish within 0s" not in reporter.text("create-driver")
    assert "driver creation did not finish" in reporter.text("create-driver")
    assert reporter.ran["a.1"] is False


def test_env_reaches_child_only(reporter, tmp_path):
    manifest = "driver: {type: os}\nenv: [DJINN_TEST_ONLY_CHILD=yes]\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo v=$DJINN_TEST_ONLY_CHILD']}\n"
    runner, _ = make_runner(manifest, reporter, tmp_path)
    runner.run()
    assert "v=yes" in reporter.text("a.1")
    assert "DJINN_TEST_ONLY_CHILD" not in os.environ


def _commands(commands) -> str:
    return "\n".join(f"      - {json.dumps(c)}" for c in commands)


def test_masked_value_never_shows_in_a_dash_trace(reporter, tmp_path):
    """/bin/sh here is dash: what its `set -x` prints of a value with ', $, spaces, tab, \\ and a newline is masked."""
    assert os.path.realpath("/bin/sh").endswith("dash")
    manifest = f"driver: {{type: os}}\nstages: [a]\njobs:\n  - stage: a\n    commands:\n{_commands(SECRET_COMMANDS)}\n"
    runner, _ = make_runner(manifest, reporter, tmp_path, variables=[Variable("SECRET", SECRET_VALUE, masked=True)])
    assert runner.run() is Status.PASSED, reporter.output
    assert_no_secret(reporter.text("a.1"))


DAEMONS = """
driver: {type: os}
stages: [a, b]
jobs:
  - stage: a
    commands:
      - setsid sleep 1000 & echo $! > setsid.pid
      - sh -c 'sleep 1001 & echo $! > daemon.pid' &
      - setsid sh -c 'setsid sleep 1002 & echo $! > deep.pid; sleep 1003' & echo $! > parent.pid
      - while [ ! -s daemon.pid ] || [ ! -s deep.pid ]; do sleep 0.05; done
      - echo started
      - LAST
  - stage: b
    commands: ["cat ../workspace/*.pid"]
"""


def _daemon_pids(driver: OSDriver) -> list[int]:
    assert driver.root is not None
    return [int((driver.workspace / f"{n}.pid").read_text()) for n in ("setsid", "daemon", "deep", "parent")]


def test_setsid_and_double_forked_children_do_not_outlive_the_job(reporter, tmp_path):
    runner, driver = make_runner(DAEMONS.replace("LAST", "echo done"), reporter, tmp_path)
    pids: list[int] = []
    # Read the pids while the build directory still exists: the second job runs after the first one's end.
    reporter_finished = reporter.job_finished

    def finished(job, status, ran):
        if job.name == "a.1":
            pids.extend(_daemon_pids(driver))
        reporter_finished(job, status, ran)

    reporter.job_finished = finished
    assert runner.run() is Status.PASSED, reporter.output
    assert len(pids) == 4
    assert not [p for p in pids if pid_alive(p)], "processes outlived the job"
    assert "started" in reporter.text("a.1")


def test_setsid_children_are_killed_with_the_build(reporter, tmp_path):
    runner, driver = make_runner(DAEMONS.replace("LAST", "sleep 600"), reporter, tmp_path)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while "started" not in reporter.text("a.1") and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = _daemon_pids(driver)
    assert all(pid_alive(p) for p in pids)
    runner.cancel()
    thread.join(30)
    assert result == [Status.KILLED]
    assert not [p for p in pids if pid_alive(p)], "processes outlived the kill"


def test_artifacts_through_symlinked_directories_are_refused(reporter, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("canary\n")
    manifest = f"""
driver: {{type: os}}
stages: [a]
jobs:
  - stage: a
    commands: ["ln -s {outside} dirlink", "ln -s dirlink chained", "mkdir sub", "echo in > real.txt", "ln -s ../real.txt sub/ok"]
    artifacts: ["dirlink/canary.txt", "chained/canary.txt", "dirlink/*.txt", "sub/ok => ok.txt"]
"""
    runner, _ = make_runner(manifest, reporter, tmp_path)
    assert runner.run() is Status.PASSED, reporter.output
    out = reporter.text("a.1")
    for source in ("dirlink/canary.txt", "chained/canary.txt", "dirlink/*.txt"):
        assert f"artifact {source}: artifact source" in out and "leaves the build directory" in out, out
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["ok.txt"]


def test_key_names_must_be_plain_file_names(reporter, tmp_path):
    manifest = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n"
    runner, driver = make_runner(manifest, reporter, tmp_path, keys=[Key("../../escaped", "-----FAKE KEY-----\n")])
    assert runner.run() is Status.FAILED
    assert "djinn: key name '../../escaped' must be a plain file name" in reporter.text("create-driver")
    assert not (tmp_path / "escaped").exists()


def test_the_tag_sweep_reads_only_processes_made_since_the_build_began():
    """Pids come round in turn up to pid_max: those made since a reading lie after its last pid, cyclically."""
    clock = _PidClock(last=30000, made=1000, limit=32768)
    real = _PidClock.now()
    assert real.last and real.made and real.limit  # this kernel has the files the sweep relies on
    cases = {
        # (last pid now, processes made since): pids the sweep reads / skips
        (30500, 500): ([30001, 30500], [30000, 29999, 30501, 5]),
        (400, 3000): ([30001, 32767, 300, 400], [30000, 401, 29000]),  # wrapped once
    }
    for (last, made), (read, skipped) in cases.items():
        ranges = clock.made_since(_PidClock(last=last, made=clock.made + made, limit=32768))
        assert ranges is not None
        assert [pid for pid in read + skipped if any(pid in r for r in ranges)] == read
    # So many made that pids may have come round past the reading: every process is read.
    assert clock.made_since(_PidClock(last=30500, made=clock.made + 20000, limit=32768)) is None
    assert _PidClock(None, None, None).made_since(real) is None  # nothing known: nothing ruled out


def test_the_tag_sweep_finds_a_tagged_process_however_many_pids_it_must_consider():
    """Few pids made since the build began: each is looked up; many, or nothing known: /proc is listed."""
    driver = OSDriver()
    driver.create({}, bytearray().extend)
    tagged = subprocess.Popen(["sleep", "60"], env=driver.env, start_new_session=True)
    untagged = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        real = _PidClock.now()
        assert sum(map(len, driver._born.made_since(real))) <= os_driver.DIRECT_LOOKUPS
        many = _PidClock(last=1, made=real.made - 1, limit=real.limit)
        assert sum(map(len, many.made_since(real))) > os_driver.DIRECT_LOOKUPS
        for born in (driver._born, many, None):
            driver._born = born
            assert driver.tagged_processes() == [tagged.pid]
    finally:
        for proc in (tagged, untagged):
            proc.kill()
            proc.wait()
        driver.destroy()


def test_a_script_is_run_from_the_command_line_and_a_big_one_from_a_file():
    """Small scripts need no file of their own; one too big for an argument still runs, from beside the workspace."""
    driver = OSDriver()
    out = bytearray()
    try:
        driver.create({"K": "v"}, out.extend)
        assert driver.execute("small.1", b"#!/bin/sh\nexec 2>&1\necho \"$0 $K\"\nnope\n", out.extend) == 127
        text = out.decode()
        assert "small.1.sh v\n" in text and "small.1.sh: 4: nope: not found" in text  # no temporary path in the output
        assert sorted(p.name for p in driver.root.iterdir()) == ["workspace"]  # no script, no marker file
        big = "x" * 200_000
        out.clear()
        assert driver.execute("big.1", f"#!/bin/sh\nV='{big}'\necho ${{#V}} \"$0\"\n".encode(), out.extend) == 0
        assert out.decode() == f"200000 {driver.root}/big.1.sh\n"
        assert not (driver.root / "big.1.sh").exists()  # removed with its job
        assert list(driver.workspace.iterdir()) == []  # never in the workspace
        made = driver.root
    finally:
        driver.destroy()
    assert SCRATCH.drain(10) and not made.exists()


class _Told(Reporter):
    def __init__(self, name: str, heard: list, fail_on: str | None = None) -> None:
        self.name, self.heard, self.fail_on = name, heard, fail_on

    def _hear(self, what: str) -> None:
        self.heard.append(f"{self.name}:{what}")
        if what == self.fail_on:
            raise RuntimeError(f"{self.name} failed on {what}")

    def build_started(self) -> None:
        self._hear("build_started")

    def job_started(self, job) -> None:
        self._hear("job_started")

    def job_output(self, job, data: bytes) -> None:
        self._hear("job_output")

    def job_finished(self, job, status: Status, ran: bool) -> None:
        self._hear("job_finished")

    def build_finished(self, status: Status) -> None:
        self._hear("build_finished")


def test_reporters_side_by_side_nest_their_starts_and_ends_and_all_hear_an_end():
    heard: list[str] = []
    manifest = parse_manifest("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo hi']}\n")
    runner = Runner(plan_build(manifest), OSDriver(), reporter=Reporters(_Told("outer", heard), _Told("inner", heard)))
    assert runner.run() is Status.PASSED
    per_job = ["outer:job_started", "inner:job_started", "inner:job_finished", "outer:job_finished"]
    assert [h for h in heard if "job_output" not in h] == [
        "outer:build_started", "inner:build_started",
        *per_job,  # the driver's creation
        *per_job,  # a.1
        "inner:build_finished", "outer:build_finished",
    ]
    assert heard.count("outer:job_output") == heard.count("inner:job_output") > 0

    # An end one reporter fails on still reaches the others; the first error is raised after.
    heard.clear()
    both = Reporters(_Told("outer", heard), _Told("inner", heard, fail_on="build_finished"))
    try:
        both.build_finished(Status.PASSED)
    except RuntimeError as exc:
        assert str(exc) == "inner failed on build_finished"
    else:
        raise AssertionError("the inner reporter's error was swallowed")
    assert heard == ["inner:build_finished", "outer:build_finished"]

