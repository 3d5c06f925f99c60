"""`djinn-worker` as operators type it: -version, flags before or after the command, exit codes,
services that are down, a closed pipe, and bad input at submit. Real processes, real services."""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from services import free_port
from worker_support import CELERY, WORKER

QUEUED = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo hi']}\n"


def run(*args: str | bytes, cwd: Path | None = None, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    argv = [os.fsencode(WORKER), *(a if isinstance(a, bytes) else os.fsencode(a) for a in args)]
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(
        res.args, res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    )


def one_line(res: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a command that failed with `code`."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("djinn-worker: ")
    return lines[0]


def build_count(worker_env) -> int:
    return worker_env.sql("SELECT count(*) FROM builds")[0][0]


def test_version_before_or_after_any_command(tmp_path):
    expected = f"djinn-worker {version('djinn-worker')} linux/"
    for args in (["-version"], ["--version"], ["migrate", "-version"], ["-version", "submit"], ["status", "--version"]):
        res = run(*args, cwd=tmp_path)
        assert res.returncode == 0, (args, res.stderr)
        assert res.stdout.startswith(expected) and res.stdout.count("\n") == 1, res.stdout


def test_flags_before_or_after_every_command(worker_env, tmp_path):
    config = str(worker_env.config)
    for args in (["-config", config, "migrate"], ["migrate", "-config", config], [f"--config={config}", "migrate"]):
        res = run(*args)
        assert res.returncode == 0, (args, res.stderr)
        assert res.stdout.startswith("schema is up to date"), res.stdout

    manifest = tmp_path / "m.yml"
    manifest.write_text(QUEUED)
    first = json.loads(run("-config", config, "submit", str(manifest), "-json").stdout)
    second = json.loads(run("submit", "-json", str(manifest), "-config", config).stdout)
    assert second["id"] == first["id"] + 1

    for command, extra in (("status", ["-json"]), ("logs", [])):
        before = run("-config", config, command, str(first["id"]), *extra)
        after = run(command, str(first["id"]), *extra, "-config", config)
        assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
        assert before.stdout == after.stdout
    # kill of a build that does not exist: the same refusal either way.
    assert one_line(run("-config", config, "kill", "999999"), 2) == one_line(run("kill", "999999", "-config", config), 2)
    assert one_line(run("kill", "999999", "-config", config), 2) == "djinn-worker: no build with id 999999"
    # The daemon (no command) takes its flags in any order too.
    checks = [
        run("-config", config, "-driver", str(worker_env.driver_config), "-check"),
        run("-check", "-driver", str(worker_env.driver_config), "-config", config),
    ]
    assert checks[0].returncode == checks[1].returncode == 0, checks[0].stderr
    assert checks[0].stdout == checks[1].stdout


def test_every_command_exits_1_naming_postgres_when_it_is_down(worker_env, tmp_path):
    port = free_port()
    config = tmp_path / "down.conf"
    config.write_text(worker_env.config.read_text().replace(worker_env.postgres.addr.split(":")[1], str(port), 1))
    assert f"127.0.0.1:{port}" in config.read_text() or f"localhost:{port}" in config.read_text()
    manifest = tmp_path / "m.yml"
    manifest.write_text(QUEUED)
    for args in (
        ["migrate"],
        ["submit", str(manifest)],
        ["status", "1"],
        ["logs", "1"],
        ["logs", "-f", "1"],
        ["kill", "1"],
        ["-driver", str(worker_env.driver_config)],  # the daemon
    ):
        line = one_line(run("-config", str(config), *args), 1)
        assert "cannot connect to PostgreSQL at " in line and f":{port}" in line, (args, line)


def test_commands_that_need_redis_exit_1_naming_it_when_it_is_down(worker_env, tmp_path):
    manifest = tmp_path / "m.yml"
    manifest.write_text(QUEUED)
    build_id = worker_env.submit(QUEUED)
    worker_env.sql("UPDATE builds SET status = 'running' WHERE id = :id", id=build_id)
    port = free_port()
    config = tmp_path / "down.conf"
    config.write_text(worker_env.config.read_text().replace(worker_env.redis.addr, f"127.0.0.1:{port}"))
    before = build_count(worker_env)
    for args in (["submit", str(manifest)], ["kill", str(build_id)], ["-driver", str(worker_env.driver_config)]):
        line = one_line(run("-config", str(config), *args), 1)
        assert f"cannot connect to Redis at 127.0.0.1:{port}" in line, (args, line)
    assert build_count(worker_env) == before  # the refused submit wrote nothing
    # Commands that only read the database still work.
    assert run("-config", str(config), "status", str(build_id)).returncode == 0


def test_logs_follow_into_a_closed_pipe_ends_quietly(worker_env):
    worker_env.start_worker()
    build_id = worker_env.submit(
        "driver: {type: os}\nstages: [a]\njobs:\n"
        "  - {stage: a, commands: ['for i in $(seq 1 400); do echo line $i; sleep 0.02; done']}\n"
    )
    proc = subprocess.Popen(
        [WORKER, "logs", "-config", str(worker_env.config), "-f", str(build_id)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert first, "no output before the pipe was closed"
    proc.stdout.close()  # as `| head -1` does after its line
    stderr = proc.stderr.read().decode()
    assert proc.wait(90) == 0
    assert stderr == ""


def test_kill_names_the_build_not_listeners(worker_env):
    build_id = worker_env.submit(QUEUED)
    worker_env.sql("UPDATE builds SET status = 'running' WHERE id = :id", id=build_id)
    res = worker_env.cli("kill", str(build_id))
    # Nothing subscribes to this build's channel: no worker runs it.
    assert res.stdout == f"kill sent to build {build_id}, but no worker is running build {build_id}\n"


@pytest.mark.parametrize(
    "case",
    [
        "manifest-not-utf8",
        "key-file-not-utf8",
        "env-not-utf8",
        "secret-not-utf8",
        "surrogate-escape-in-command",
        "namespace-too-deep",
        "user-too-long",
        "email-too-long",
        "key-name-with-path",
        "secret-from-unset-variable",
        "build-id-out-of-range",
    ],
)
def test_bad_submit_input_is_one_line_exit_2_and_writes_nothing(worker_env, tmp_path, case):
    manifest = tmp_path / "m.yml"
    manifest.write_text(QUEUED)
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    env = {k: v for k, v in os.environ.items() if k != "DJINN_UNSET_SECRET"}
    args: list[str | bytes] = ["submit", str(manifest)]
    expect = ""
    if case == "manifest-not-utf8":
        manifest.write_bytes(QUEUED.encode() + b"# caf\xe9\n")
        expect = f"{manifest}: not valid UTF-8"
    elif case == "key-file-not-utf8":
        key.write_bytes(b"\xff\xfe key")
        args += ["-key", f"id_ed25519={key}"]
        expect = f"-key id_ed25519: {key}: not valid UTF-8"
    elif case == "env-not-utf8":
        args += ["-env", b"NAME=caf\xe9"]
        expect = "-env NAME value is not valid UTF-8"
    elif case == "secret-not-utf8":
        args += ["-secret", b"TOKEN=\xff"]
        expect = "-secret TOKEN value is not valid UTF-8"
    elif case == "surrogate-escape-in-command":
        manifest.write_text('driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ["echo \\ud800"]}\n')
        expect = f"{manifest}:"
    elif case == "namespace-too-deep":
        manifest.write_text("namespace: " + "/".join(["n"] * 21) + "\n" + QUEUED)
        expect = "namespace n/n/n"
    elif case == "user-too-long":
        args += ["-user", "u" * 65]
        expect = "-user must be 1 to 64 characters"
    elif case == "email-too-long":
        args += ["-email", "e" * 250 + "@x.org"]
        expect = "-email must be at most 255 characters"
    elif case == "key-name-with-path":
        args += ["-key", f"../../x={key}"]
        expect = "-key '../../x': the key name must be a plain file name"
    elif case == "secret-from-unset-variable":
        args += ["-secret", "DJINN_UNSET_SECRET"]
        expect = "-secret DJINN_UNSET_SECRET: no '=' and no environment variable DJINN_UNSET_SECRET"
    elif case == "build-id-out-of-range":
        args = ["status", "9" * 30]
    before = build_count(worker_env)
    res = run(*args, "-config", str(worker_env.config), env=env)
    if case == "build-id-out-of-range":
        assert res.returncode == 2 and "invalid build id" in res.stderr and "Traceback" not in res.stderr
        return
    line = one_line(res, 2)
    assert line.startswith(f"djinn-worker: {expect}"), line
    assert build_count(worker_env) == before


def test_secret_named_alone_is_taken_from_the_environment_and_masked(worker_env, tmp_path):
    worker_env.start_worker()
    manifest = tmp_path / "m.yml"
    manifest.write_text("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo token=$TOKEN']}\n")
    res = run("submit", str(manifest), "-json", "-secret", "TOKEN", "-config", str(worker_env.config),
              env={**os.environ, "TOKEN": "from-env-4711"})
    assert res.returncode == 0, res.stderr
    build_id = json.loads(res.stdout)["id"]
    assert worker_env.wait_status(build_id)["status"] == "passed"
    output = worker_env.cli("logs", str(build_id)).stdout
    assert "token=xxxxxx" in output and "from-env-4711" not in output


def test_unknown_manifest_keys_are_warned_about_and_the_build_runs(worker_env, tmp_path):
    """Upstream ignores manifest keys it does not know: submit says which, naming the line, and queues the build."""
    worker_env.start_worker()
    manifest = tmp_path / "m.yml"
    manifest.write_text("driver: {type: os}\nbuild_timeout: 10m\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo ran']}\n")
    res = run("submit", str(manifest), "-json", "-config", str(worker_env.config))
    assert res.returncode == 0, res.stderr
    warning = one_line(res, 0)
    assert warning.startswith("djinn-worker: warning: ") and "m.yml: line 2: build_timeout: unknown key" in warning, res.stderr
    build_id = json.loads(res.stdout)["id"]
    assert worker_env.wait_status(build_id)["status"] == "passed"


@pytest.mark.parametrize(
    "config, says",
    [
        ('driver "os"\nparallelism "x"\n', 'worker.conf:2: parallelism: expected an integer, got string "x"'),
        (None, "worker.conf: cannot read config file: No such file or directory"),
    ],
    ids=["bad-value", "missing-file"],
)
def test_celery_command_with_a_bad_config_says_one_line_and_exits_2(tmp_path, config, says):
    """`celery -A djinn worker` loads the config through celeryconfig: no traceback there either."""
    path = tmp_path / "worker.conf"
    if config is not None:
        path.write_text(config)
    env = {**os.environ, "DJINN_WORKER_CONFIG": str(path), "DJINN_DRIVER_CONFIG": str(tmp_path / "driver.conf")}
    res = subprocess.run([CELERY, "-A", "djinn", "worker"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == f"celery -A djinn: {path.parent}/{says}"
    assert "Traceback" not in res.stdout + res.stderr
