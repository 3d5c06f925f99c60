"""The docker driver against a real Docker engine (tests/docker_support.py brings it up).

Builds run through the Runner API and the offline `djinn` CLI in the local
busybox test image. What a build leaves behind is checked with the engine's
API by the djinn.build label every container and volume carries.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import docker
import pytest
from docker_support import IMAGE, NOTHING, labelled, wait_for
from runner_support import SECRET_COMMANDS, SECRET_PIECES, SECRET_VALUE, assert_no_secret, runner_for

from djinn.drivers import BuildIdentity, make_driver
from djinn.drivers.docker import DockerDriver, sweep
from djinn.errors import DriverError
from djinn.paths import PathEscapeError
from djinn.runner.engine import Key, Runner, Variable
from djinn.status import Status

DJINN = shutil.which("djinn", path=os.path.dirname(sys.executable)) or "djinn"
WORKER = "pytest-docker"
# Loopback port 1: nothing listens, so the pull is refused at once and nothing leaves the machine.
MISSING_IMAGE = "127.0.0.1:1/djinn-test/missing:latest"


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def make_runner(manifest: str, reporter, tmp_path: Path, build_id: str, **kwargs) -> tuple[Runner, DockerDriver]:
    def driver_for(m):
        driver = make_driver("docker", m.driver, BuildIdentity(build_id, WORKER))
        assert isinstance(driver, DockerDriver)
        return driver

    return runner_for(manifest, driver_for, reporter, tmp_path, **kwargs)


HEAD = f"driver: {{type: docker, image: '{IMAGE}', workspace: /workspace}}\n"

MULTI = HEAD + r"""
env:
  - SPACED=hello big   world
  - EQUALS=a=b=c
  - "QUOTED=it's \"quoted\""
objects:
  - data.bin => input/data.bin
  - top.txt
stages: [build, test, check]
jobs:
  - stage: build
    commands:
      - echo "$SPACED|$EQUALS|$QUOTED" > shared.txt
      - cp input/data.bin copy.bin
      - printf 'a\000b\377\n' > binary.out
      - mkdir -p logs && echo one > logs/1.log && echo two > logs/2.log && echo no > logs/3.txt
    artifacts: [shared.txt, copy.bin, binary.out => bytes.out, "logs/*.log"]
  - stage: test
    commands:
      - cat shared.txt
      - cat top.txt
      - pwd
      - ls -l /root/.ssh/id_build | cut -c1-10
      - cat /root/.ssh/config
      - echo "partial" > failed.txt
      - exit 3
    artifacts: [failed.txt => from-failed.txt, ../outside.txt, /etc/passwd, nothing-here.txt]
  - stage: check
    commands: ["echo should never run"]
"""


def test_multi_job_build_through_runner(docker_api, reporter, tmp_path):
    """Shared workspace, env with spaces and '=', objects, keys 0600, artifacts of passing and failing jobs."""
    objects = tmp_path / "objects"
    objects.mkdir()
    payload = bytes(range(256)) * 64
    (objects / "data.bin").write_bytes(payload)
    (objects / "top.txt").write_text("top object\n")
    build = new_id("multi")
    keys = [Key("id_build", "-----FAKE KEY-----\nsecret-key-body\n", "Host example\n  IdentityFile /root/.ssh/id_build")]
    runner, driver = make_runner(MULTI, reporter, tmp_path, build, keys=keys)

    assert runner.run() is Status.FAILED
    assert reporter.statuses["create-driver"] is Status.PASSED
    assert reporter.statuses["build.1"] is Status.PASSED
    assert reporter.statuses["test.1"] is Status.FAILED
    assert reporter.statuses["check.1"] is Status.FAILED and reporter.ran["check.1"] is False
    assert "should never run" not in reporter.text("check.1")

    setup = reporter.text("create-driver")
    assert f"Using Docker image {IMAGE} - sha256:" in setup
    assert "Placed object data.bin => input/data.bin" in setup
    assert "Placed key id_build => /root/.ssh/id_build" in setup

    test = reporter.text("test.1")
    # set -x traces each command; values keep their spaces, '=' and quotes.
    assert "+ cat shared.txt\nhello big   world|a=b=c|it's \"quoted\"\n" in test
    assert "+ cat top.txt\ntop object\n" in test
    assert "+ pwd\n/workspace\n" in test
    assert "-rw-------\n" in test  # the key, mode 0600, still there in the second job's container
    assert "Host example\n  IdentityFile /root/.ssh/id_build\n" in test
    assert "+ exit 3\n" in test
    # The key's text never shows: it is masked like a secret.
    assert "secret-key-body" not in test

    arts = tmp_path / "artifacts"
    assert (arts / "shared.txt").read_text() == "hello big   world|a=b=c|it's \"quoted\"\n"
    assert (arts / "copy.bin").read_bytes() == payload
    assert (arts / "bytes.out").read_bytes() == b"a\x00b\xff\n"
    assert (arts / "1.log.log").read_text() == "one\n" and (arts / "2.log.log").read_text() == "two\n"
    assert not list(arts.glob("3*"))
    assert (arts / "from-failed.txt").read_text() == "partial\n"  # collected from the failed job
    assert "artifact ../outside.txt: artifact source '../outside.txt' leaves the workspace" in test
    assert "artifact /etc/passwd: artifact source '/etc/passwd' leaves the workspace" in test
    assert "artifact nothing-here.txt: not found" in test
    stored = {(job, source) for job, source, _ in reporter.artifacts}
    assert ("build.1", "logs/1.log") in stored and ("test.1", "failed.txt") in stored

    assert labelled(docker_api, build) == NOTHING
    assert driver.leftovers == []


def test_output_streams_live_and_kill_leaves_nothing(docker_api, reporter, tmp_path):
    manifest = HEAD + "stages: [a, b]\njobs:\n  - {stage: a, commands: ['echo first-line', 'sleep 300']}\n  - {stage: b, commands: ['true']}\n"
    build = new_id("kill")
    runner, driver = make_runner(manifest, reporter, tmp_path, build)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        # The job's first line arrives while it still runs: output is streamed, not collected at the end.
        wait_for(lambda: "first-line\n" in reporter.text("a.1"), what="the job's first line")
        assert labelled(docker_api, build)["containers"], "the job's container is labelled with the build"
        assert any(v.startswith(f"djinn-{build}") for v in labelled(docker_api, build)["volumes"])
    finally:
        runner.cancel()
        thread.join(60)
    assert not thread.is_alive()
    assert result == [Status.KILLED]
    assert reporter.statuses["a.1"] is Status.KILLED
    assert reporter.statuses["b.1"] is Status.KILLED and reporter.ran["b.1"] is False
    assert labelled(docker_api, build) == NOTHING


def test_timeout_leaves_nothing(docker_api, reporter, tmp_path):
    manifest = HEAD + "stages: [a]\njobs:\n  - {stage: a, commands: ['sleep 300']}\n"
    build = new_id("timeout")
    runner, _ = make_runner(manifest, reporter, tmp_path, build, timeout=3)
    assert runner.run() is Status.TIMED_OUT
    assert reporter.statuses["a.1"] is Status.TIMED_OUT
    assert labelled(docker_api, build) == NOTHING


def test_missing_image_fails_setup_with_clear_error(docker_api, reporter, tmp_path):
    manifest = f"driver: {{type: docker, image: '{MISSING_IMAGE}', workspace: /w}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['echo nope']}}\n"
    build = new_id("missing")
    runner, _ = make_runner(manifest, reporter, tmp_path, build)
    assert runner.run() is Status.FAILED
    assert reporter.statuses["create-driver"] is Status.FAILED
    assert reporter.ran["a.1"] is False
    setup = reporter.text("create-driver")
    assert f"djinn: Docker image '{MISSING_IMAGE}' is not present and could not be pulled: " in setup
    assert labelled(docker_api, build) == NOTHING


def test_sweep_removes_leftovers_of_dead_builds_only(docker_api, tmp_path):
    """A worker that died mid-build left a container and volume; the start-up sweep removes them."""
    dead, live, other = new_id("dead"), new_id("live"), new_id("other")
    drivers = []
    for build, worker in ((dead, WORKER), (live, WORKER), (other, "another-worker")):
        driver = DockerDriver({"image": IMAGE, "workspace": "/w"}, BuildIdentity(build, worker))
        driver.create({}, lambda data: None)
        assert driver.execute("job", b"#!/bin/sh\necho hi > /w/f\n", lambda data: None) == 0
        drivers.append(driver)  # never destroyed: as if the worker had died
    try:
        assert labelled(docker_api, dead) != NOTHING
        removed = sweep({}, keep={live}, worker=WORKER)
        assert labelled(docker_api, dead) == NOTHING
        assert any(r.startswith("volume djinn-" + dead) for r in removed)
        assert any(r.startswith("container ") for r in removed)
        # A build still running, and another worker's builds, are left alone.
        assert labelled(docker_api, live)["containers"] and labelled(docker_api, live)["volumes"]
        assert labelled(docker_api, other)["containers"] and labelled(docker_api, other)["volumes"]
        # A predicate works as well as a set; worker=None sweeps every worker's leftovers.
        sweep(docker_api, keep=lambda build: build == other, worker=None)
        assert labelled(docker_api, live) == NOTHING
        assert labelled(docker_api, other)["containers"]
    finally:
        for driver in drivers:
            driver.destroy()
    assert labelled(docker_api, other) == NOTHING


def test_big_script_and_cancelled_driver(docker_api, tmp_path):
    """A script too big for one argument is copied in; a cancelled driver refuses new jobs at once."""
    build = new_id("direct")
    driver = DockerDriver({"image": IMAGE, "workspace": "/w"}, BuildIdentity(build, WORKER))
    out = bytearray()
    try:
        driver.create({"K": "v w=x"}, out.extend)
        driver.place("sub/obj.txt", io.BytesIO(b"obj"), 0o640)
        with pytest.raises(PathEscapeError):
            driver.place("../escape.txt", io.BytesIO(b"x"))
        big = "x" * 200_000
        script = f"#!/bin/sh\nexec 2>&1\nset -e\nV='{big}'\necho ${{#V}} \"$K\"\nstat -c %a sub/obj.txt\necho $0\n".encode()
        assert driver.execute("big.job", script, out.extend) == 0
        assert "200000 v w=x\n640\n/.djinn/big.job.sh\n" in out.decode()
        ((path, stream),) = list(driver.collect("sub/obj.txt"))
        assert (path, stream.read()) == ("sub/obj.txt", b"obj")
        driver.cancel()
        assert driver.execute("after", b"#!/bin/sh\necho no\n", out.extend) != 0
        assert "no\n" not in out.decode().split("/.djinn/big.job.sh\n", 1)[1]
    finally:
        driver.destroy()
        driver.destroy()  # idempotent
    assert labelled(docker_api, build) == NOTHING


def test_unreachable_engine_is_a_driver_error(docker_api, tmp_path):
    settings = {"image": IMAGE, "workspace": "/w", "host": f"unix://{tmp_path}/none.sock"}
    driver = DockerDriver(settings)
    with pytest.raises(DriverError, match="cannot reach the Docker engine at unix://"):
        driver.create({}, lambda data: None)
    driver.destroy()
    with pytest.raises(DriverError, match="cannot reach the Docker engine at unix://"):
        DockerDriver.check(settings)
    DockerDriver.check({"host": None, "version": None})  # the running engine answers

    # An engine that answered once (its API version is remembered) and is gone later: the same clear error.
    link = tmp_path / "engine.sock"
    link.symlink_to("/var/run/docker.sock")
    settings["host"] = f"unix://{link}"
    DockerDriver.check(settings)
    link.unlink()
    driver = DockerDriver(settings)
    with pytest.raises(DriverError, match=f"cannot reach the Docker engine at unix://{link}"):
        driver.create({}, lambda data: None)
    driver.destroy()


# --- the offline runner CLI --------------------------------------------------

CLI_BUILD = """
driver: {{type: docker, image: '{image}', workspace: /src, build_id: {build}}}
env: ["MSG=hi there=you"]
objects: ["in.txt => input/in.txt"]
stages: [build, test]
jobs:
  - stage: build
    commands: ["cat input/in.txt > out.txt", "echo \\"$MSG\\" >> out.txt"]
    artifacts: ["out.txt => result.txt"]
  - stage: test
    commands: ["grep 'hi there=you' out.txt", "exit 4"]
    artifacts: ["out.txt => again.txt"]
"""


def djinn(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DJINN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_offline_cli_multi_job_build(docker_api, tmp_path):
    build = new_id("cli")
    (tmp_path / ".djinn.yml").write_text(CLI_BUILD.format(image=IMAGE, build=build))
    (tmp_path / "objs").mkdir()
    (tmp_path / "objs" / "in.txt").write_text("from object\n")
    res = djinn("-objects", "objs", "-artifacts", "arts", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "==> Job build.1 passed" in res.stdout
    assert "+ grep 'hi there=you' out.txt\nhi there=you\n+ exit 4\n" in res.stdout
    assert "==> Job test.1 failed" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1] == "==> Build failed"
    assert (tmp_path / "arts" / "result.txt").read_text() == "from object\nhi there=you\n"
    assert (tmp_path / "arts" / "again.txt").read_text() == "from object\nhi there=you\n"
    assert labelled(docker_api, build) == NOTHING


def test_offline_cli_timeout_and_missing_image(docker_api, tmp_path):
    build = new_id("cli-timeout")
    (tmp_path / ".djinn.yml").write_text(
        f"driver: {{type: docker, image: '{IMAGE}', workspace: /w, build_id: {build}}}\n"
        "stages: [a]\njobs:\n  - {stage: a, commands: ['sleep 300']}\n"
    )
    res = djinn("-timeout", "2s", cwd=tmp_path)
    assert res.returncode == 1
    assert "==> Build timed_out" in res.stdout
    assert labelled(docker_api, build) == NOTHING

    (tmp_path / "missing.yml").write_text(
        f"driver: {{type: docker, image: '{MISSING_IMAGE}', workspace: /w}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['true']}}\n"
    )
    res = djinn("-manifest", "missing.yml", cwd=tmp_path)
    assert res.returncode == 1
    assert f"djinn: Docker image '{MISSING_IMAGE}' is not present and could not be pulled" in res.stdout
    assert "==> Job create-driver failed" in res.stdout
    assert "==> Build failed" in res.stdout


def test_absent_image_is_pulled_from_a_registry(docker_api, registry, reporter, tmp_path):
    repository, tag = f"{registry}/djinn-test/pulled", uuid.uuid4().hex[:8]
    image = f"{repository}:{tag}"
    docker_api.tag(IMAGE, repository, tag=tag)
    try:
        errors = [e["error"] for e in docker_api.push(repository, tag=tag, stream=True, decode=True) if "error" in e]
        assert errors == []
        docker_api.remove_image(image)  # only the tag goes: the test image keeps the layers
        with pytest.raises(docker.errors.ImageNotFound):
            docker_api.inspect_image(image)
        manifest = f"driver: {{type: docker, image: '{image}', workspace: /w}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['echo pulled-and-ran']}}\n"
        build = new_id("pull")
        runner, _ = make_runner(manifest, reporter, tmp_path, build)
        assert runner.run() is Status.PASSED, reporter.text("create-driver")
        assert f"Image {image} is not present, pulling it...\nUsing Docker image {image} - sha256:" in reporter.text("create-driver")
        assert "\npulled-and-ran\n" in reporter.text("a.1")
        assert labelled(docker_api, build) == NOTHING
    finally:
        try:
            docker_api.remove_image(image)
        except docker.errors.NotFound:
            pass


def test_offline_cli_ctrl_c_kills_and_leaves_nothing(docker_api, tmp_path):
    build = new_id("cli-kill")
    (tmp_path / ".djinn.yml").write_text(
        f"driver: {{type: docker, image: '{IMAGE}', workspace: /w, build_id: {build}}}\n"
        "stages: [a]\njobs:\n  - {stage: a, commands: ['echo started', 'sleep 300']}\n"
    )
    proc = subprocess.Popen([DJINN], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line == "started\n":
                break
        assert lines[-1] == "started\n", "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "==> Build killed" in rest
    assert labelled(docker_api, build) == NOTHING


def _secret_manifest(commands) -> str:
    lines = "\n".join(f"      - {json.dumps(c)}" for c in commands)
    return HEAD + f"stages: [use]\njobs:\n  - stage: use\n    commands:\n{lines}\n      - sleep 300\n"


def test_masked_value_never_shows_in_busybox_trace_nor_in_inspect(docker_api, reporter, tmp_path):
    """busybox ash's `set -x` quoting ('"'"' and friends) is masked; the value is not in the container's config."""
    build = new_id("mask")
    commands = [*SECRET_COMMANDS, "stat -c '%a' /.djinn/env", 'echo "plain=$PLAIN"']
    runner, _ = make_runner(
        _secret_manifest(commands),
        reporter,
        tmp_path,
        build,
        variables=[Variable("SECRET", SECRET_VALUE, masked=True), Variable("PLAIN", "visible"), Variable("BAD-NAME", "x")],
    )
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_for(lambda: "\n+ sleep 300\n" in reporter.text("use.1"), 120, "the job to reach its sleep")
        (container,) = docker_api.containers(filters={"label": [f"djinn.build={build}"]})
        inspected = docker_api.inspect_container(container["Id"])
        config = json.dumps(inspected)
        for piece in SECRET_PIECES + ("visible",):
            assert piece not in config, f"{piece!r} is in docker inspect"
        assert not any(e.startswith(("SECRET=", "PLAIN=")) for e in inspected["Config"]["Env"] or [])
    finally:
        runner.cancel()
        thread.join(120)
    text = reporter.text("use.1")
    assert_no_secret(text)
    assert "+ stat -c '%a' /.djinn/env\n600\n" in text
    assert "plain=visible" in text
    assert "'BAD-NAME' are not shell names" in reporter.text("create-driver")
    assert labelled(docker_api, build) == NOTHING


SYMLINKS = HEAD + """stages: [make]
jobs:
  - stage: make
    commands:
      - mkdir -p /outside && echo canary > /outside/canary.txt && echo inside > real.txt
      - ln -s /outside dirlink
      - ln -s /outside/canary.txt filelink
      - ln -s ../outside/canary.txt relative-link
      - mkdir -p sub && ln -s ../real.txt sub/ok-link
      - ln -s dirlink chained
    artifacts: [dirlink/canary.txt, filelink, relative-link, "dirlink/*.txt", chained/canary.txt, sub/ok-link => ok.txt]
"""


def test_artifacts_through_symlinks_out_of_the_workspace_are_refused(docker_api, reporter, tmp_path):
    build = new_id("links")
    runner, _ = make_runner(SYMLINKS, reporter, tmp_path, build)
    assert runner.run() is Status.PASSED, reporter.output
    text = reporter.text("make.1")
    for source in ("dirlink/canary.txt", "filelink", "relative-link", "dirlink/*.txt", "chained/canary.txt"):
        assert f"djinn: artifact {source}: artifact source {source!r} leads outside the workspace" in text, text
    arts = tmp_path / "artifacts"
    assert sorted(p.name for p in arts.iterdir()) == ["ok.txt"]
    assert (arts / "ok.txt").read_text() == "inside\n"
    assert all(b"canary" not in p.read_bytes() for p in arts.iterdir())
    assert labelled(docker_api, build) == NOTHING


PIPELINED = HEAD + """stages: [a]
jobs:
  - {stage: a, name: one, commands: ['echo 1 > order', 'touch started', 'while [ ! -e /workspace/go-on ]; do sleep 0.05; done']}
  - {stage: a, name: two, commands: ['echo 2 >> order', 'cat order', 'test -z "$(cat)" && echo stdin-empty']}
  - {stage: a, name: three, commands: ['echo 3 >> order', 'cat order']}
"""


def _job_containers(api: docker.APIClient, build: str) -> dict[str, dict]:
    return {c["Labels"]["djinn.job"]: c for c in api.containers(all=True, filters={"label": f"djinn.build={build}"})}


def test_next_jobs_container_waits_started_while_a_job_runs_and_runs_after_it(docker_api, reporter, tmp_path):
    build = new_id("pipelined")
    runner, driver = make_runner(PIPELINED, reporter, tmp_path, build)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        wait_for(lambda: _job_containers(docker_api, build).get("two", {}).get("State") == "running", what="job two's container started")
        # Started, but held at its gate: it has written nothing to the shared workspace.
        assert reporter.text("two") == ""
        exec_id = docker_api.exec_create(_job_containers(docker_api, build)["one"]["Id"], ["cat", "/workspace/order"])
        assert docker_api.exec_start(exec_id) == b"1\n"
        exec_id = docker_api.exec_create(_job_containers(docker_api, build)["one"]["Id"], ["touch", "/workspace/go-on"])
        docker_api.exec_start(exec_id)
        thread.join(60)
    finally:
        runner.cancel()
        thread.join(60)
    assert result == [Status.PASSED], reporter.output
    assert "1\n2\n" in reporter.text("two") and "stdin-empty\n" in reporter.text("two")
    assert "1\n2\n3\n" in reporter.text("three")
    assert labelled(docker_api, build) == NOTHING


def test_a_pipelined_build_killed_mid_job_leaves_no_container(docker_api, reporter, tmp_path):
    build = new_id("pipekill")
    runner, _ = make_runner(PIPELINED, reporter, tmp_path, build)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        # Job one runs, job two's container waits started, and the network holder with it.
        wait_for(lambda: _job_containers(docker_api, build).get("two", {}).get("State") == "running", what="job two's container started")
        assert {"one", "two", "network"} <= set(_job_containers(docker_api, build))
    finally:
        runner.cancel()
        thread.join(60)
    assert not thread.is_alive() and result == [Status.KILLED]
    assert reporter.ran["two"] is False and reporter.ran["three"] is False
    assert labelled(docker_api, build) == NOTHING
