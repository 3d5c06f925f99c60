"""The ssh driver against a real OpenSSH sshd on loopback (tests/sshd_support.py).

The server runs on this machine, so the tests can look at the remote side
directly: files in the workspace, processes by pid.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest
from runner_support import BASH_SECRET_COMMANDS, SECRET_COMMANDS, SECRET_PIECES, SECRET_VALUE, assert_no_secret, runner_for
from sshd_support import SSHServer
from waiting import wait_for

from djinn.config import DriverConfig, SSHSettings
from djinn.drivers.ssh import SSHDriver, parse_address
from djinn.errors import DriverError
from djinn.runner.engine import Key, Runner, Variable
from djinn.status import Status

DJINN = shutil.which("djinn", path=os.path.dirname(sys.executable)) or "djinn"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False




def make_runner(manifest: str, reporter, tmp_path: Path, settings: dict, **kwargs) -> tuple[Runner, SSHDriver]:
    def driver_for(m):
        return SSHDriver({**settings, **m.driver}, configured=DriverConfig.defaults().settings_for("ssh"))

    return runner_for(manifest, driver_for, reporter, tmp_path, **kwargs)


def root_settings(server: SSHServer) -> dict:
    return {"user": "root", "key": str(server.key), "timeout": "10s"}


def djinn_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DJINN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- through the offline runner CLI -----------------------------------------

BUILD = """
driver:
  type: ssh
  address: {address}
  workspace: {workspace}
env:
  - SPACED=hello big world
  - EQUALS=a=b=c
  - QUOTES=it's "quoted" $HOME `x`
objects:
  - in.txt => input/in.txt
stages: [build, test]
jobs:
  - stage: build
    commands:
      - mkdir -p out
      - echo "$SPACED|$EQUALS" > out/a.txt
      - printf '%s\\n' "$QUOTES" > out/c.txt
      - echo skip > out/b.log
      - stat -c %a "$0" > script-mode.txt
      - echo "$0" > script-path.txt
    artifacts:
      - out/*.txt => copy-*
      - out/b.log
  - stage: test
    commands:
      - cat input/in.txt
      - cat out/a.txt
      - test "$EQUALS" = "a=b=c"
      - pwd
      - test ! -e "$(cat script-path.txt)"
      - test -e "$0"
"""


def test_cli_multi_job_build_env_objects_glob_artifacts(sshd, tmp_path):
    workspace = tmp_path / "ws"
    (tmp_path / ".djinn.yml").write_text(BUILD.format(address=sshd.address, workspace=workspace))
    (tmp_path / "driver.conf").write_text(f'driver ssh {{\n  user "root"\n  key "{sshd.key}"\n  timeout 10s\n}}\n')
    (tmp_path / "objs").mkdir()
    (tmp_path / "objs" / "in.txt").write_text("from the object store\n")
    res = djinn_cli("-driver", "driver.conf", "-objects", "objs", "-artifacts", "arts", cwd=tmp_path)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"Established SSH connection to {sshd.address}, working in {workspace}" in out
    assert "Placed object in.txt => input/in.txt" in out
    # set -x traces; values keep spaces, '=' and shell characters.
    assert "+ cat out/a.txt\nhello big world|a=b=c\n" in out
    assert "from the object store\n" in out
    assert f"+ pwd\n{workspace}\n" in out
    assert out.rstrip().splitlines()[-1] == "==> Build passed"
    arts = tmp_path / "arts"
    assert sorted(p.name for p in arts.iterdir()) == ["b.log", "copy-a.txt", "copy-c.txt"]
    assert (arts / "copy-a.txt").read_text() == "hello big world|a=b=c\n"
    assert (arts / "copy-c.txt").read_text() == "it's \"quoted\" $HOME `x`\n"
    assert (workspace / "input" / "in.txt").read_text() == "from the object store\n"
    # The job script was uploaded 0755 outside the workspace and is gone, with the driver's directory.
    assert (workspace / "script-mode.txt").read_text().strip() == "755"
    script = (workspace / "script-path.txt").read_text().strip()
    assert script.startswith("/tmp/.djinn-") and script.endswith("/build.1.sh")
    assert not os.path.exists(script)
    assert not os.path.exists(os.path.dirname(script))  # the driver's private directory


def test_cli_failing_command_fails_the_job_and_stops_the_build(sshd, tmp_path):
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}', workspace: '{tmp_path / 'ws'}'}}\n"
        "stages: [one, two]\n"
        "jobs:\n"
        "  - {stage: one, commands: ['echo before', 'exit 3', 'echo never']}\n"
        "  - {stage: two, commands: ['echo second-stage']}\n"
    )
    (tmp_path / "m.yml").write_text(manifest)
    (tmp_path / "driver.conf").write_text(f'driver ssh {{\n  key "{sshd.key}"\n  timeout 10s\n}}\n')
    res = djinn_cli("-manifest", "m.yml", "-driver", "driver.conf", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "+ echo before\nbefore\n+ exit 3\n" in res.stdout
    assert "==> Job one.1 failed" in res.stdout
    assert "echo never" not in res.stdout and "second-stage" not in res.stdout
    assert "==> Build failed" in res.stdout


def test_cli_wrong_credentials_fail_clearly_after_the_timeout(sshd, tmp_path):
    (tmp_path / "m.yml").write_text(f"driver: {{type: ssh, address: '{sshd.address}'}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['echo hi']}}\n")
    (tmp_path / "driver.conf").write_text('driver ssh {\n  user "root"\n  password "wrong"\n  timeout 3s\n}\n')
    started = time.monotonic()
    res = djinn_cli("-manifest", "m.yml", "-driver", "driver.conf", cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert res.returncode == 1
    assert f"djinn: could not log in to {sshd.address} as root within 3s: authentication failed" in res.stdout
    assert "check the ssh driver's user, password and key" in res.stdout
    assert "==> Build failed" in res.stdout and "echo hi" not in res.stdout
    assert elapsed >= 3  # retried until the timeout, not given up at the first refusal


def test_wrong_key_and_unreachable_port_give_clear_errors(sshd, tmp_path, reporter):
    driver = SSHDriver({"address": sshd.address, "key": str(sshd.other_key), "timeout": "2s"})
    with pytest.raises(DriverError, match=rf"could not log in to {sshd.address} as root within 2s: authentication failed \(tried: publickey"):
        driver.create({}, lambda data: None)
    driver.destroy()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    driver = SSHDriver({"address": f"127.0.0.1:{port}", "timeout": "1s"})
    with pytest.raises(DriverError, match=rf"could not connect to 127.0.0.1:{port} \(user root\) within 1s: .*refused"):
        driver.create({}, lambda data: None)
    driver.destroy()
    with pytest.raises(DriverError, match="key .*missing.key"):
        SSHDriver({"address": sshd.address, "key": str(tmp_path / "missing.key")}).create({}, lambda data: None)


# --- through the Runner API -------------------------------------------------

EMPTY_PASSWORD_BUILD = """
driver: {{type: ssh, address: '{address}'}}
env: ["GREETING=hello there"]
objects: ["tool.sh => bin/tool.sh"]
stages: [build]
jobs:
  - stage: build
    commands:
      - pwd
      - id -un
      - sh bin/tool.sh
      - stat -c '%a %n' .ssh .ssh/deploy .ssh/config
      - echo "odd name given"
    artifacts: ["bin/tool.sh => tool-copy.sh", "missing/*.txt"]
"""


def test_empty_password_user_keys_objects_and_default_workspace(sshd, tmp_path, reporter):
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "tool.sh").write_text('echo "tool says $GREETING"\n')
    mark = len(sshd.log_text())
    runner, _ = make_runner(
        EMPTY_PASSWORD_BUILD.format(address=sshd.address),
        reporter,
        tmp_path,
        {"user": sshd.empty_user, "timeout": "10s"},
        variables=[Variable("GREETING", "hello there"), Variable("ODD-NAME", "via env(1)")],
        keys=[Key("deploy", "-----BEGIN FAKE KEY-----\nabc\n", config="Host example\n  IdentityFile ~/.ssh/deploy")],
    )
    assert runner.run() is Status.PASSED, reporter.output
    text = reporter.text("build.1")
    home = str(sshd.empty_home)
    assert f"+ pwd\n{home}\n+ id -un\n{sshd.empty_user}\n" in text
    assert "tool says hello there\n" in text
    assert "700 .ssh\n600 .ssh/deploy\n600 .ssh/config\n" in text
    # dash drops variables whose names are not shell names; the build still runs.
    assert "\nodd name given\n" in text
    assert "djinn: artifact missing/*.txt: not found" in text
    setup = reporter.text("create-driver")
    assert f"Placed key deploy => {home}/.ssh/deploy" in setup
    assert (tmp_path / "artifacts" / "tool-copy.sh").read_text() == 'echo "tool says $GREETING"\n'
    # No password and no key configured: the `none` method with the empty password.
    assert f"Accepted none for {sshd.empty_user}" in sshd.log_text()[mark:]


def test_explicit_empty_password_logs_in(sshd, tmp_path):
    driver = SSHDriver({"address": sshd.address, "user": sshd.empty_user, "password": "", "timeout": "5s"})
    try:
        driver.create({}, lambda data: None)
        chunks: list[bytes] = []
        assert driver.execute("who", b"#!/bin/sh\nid -un\n", chunks.append) == 0
        assert b"".join(chunks) == f"{sshd.empty_user}\n".encode()
    finally:
        driver.destroy()


def test_output_is_streamed_while_the_job_runs(sshd, tmp_path, reporter):
    workspace = tmp_path / "ws"
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}', workspace: '{workspace}'}}\nstages: [s]\njobs:\n"
        "  - {stage: s, commands: ['echo ready', 'while [ ! -f go ]; do sleep 0.05; done', 'echo finished']}\n"
    )
    runner, _ = make_runner(manifest, reporter, tmp_path, root_settings(sshd))
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        # The job waits for us: its first line can only be seen if output is streamed live.
        wait_for(lambda: "\nready\n" in reporter.text("s.1"), 30, lambda: reporter.text("s.1"))
        assert "finished" not in reporter.text("s.1")
        (workspace / "go").touch()
    finally:
        thread.join(60)
    assert result == [Status.PASSED]
    assert reporter.text("s.1").endswith("+ echo finished\nfinished\n")


KILL_BUILD = """
driver: {{type: ssh, address: '{address}', workspace: '{workspace}'}}
stages: [s, t]
jobs:
  - stage: s
    commands:
      - echo $$ > job.pid
      - sleep 600 &
      - echo $! > bg.pid
      - echo started
      - wait
  - stage: t
    commands: ["echo never"]
"""


@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_kill_and_timeout_stop_the_remote_processes(sshd, tmp_path, reporter, how):
    workspace = tmp_path / "ws"
    kwargs = {"timeout": 3} if how == "timeout" else {}
    runner, driver = make_runner(KILL_BUILD.format(address=sshd.address, workspace=workspace), reporter, tmp_path,
                                 root_settings(sshd), **kwargs)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    wait_for(lambda: "\nstarted\n" in reporter.text("s.1"), 30, lambda: reporter.text("s.1"))
    job_pid = int((workspace / "job.pid").read_text())
    bg_pid = int((workspace / "bg.pid").read_text())
    assert pid_alive(job_pid) and pid_alive(bg_pid)
    private = driver.private_dir
    assert private is not None and os.path.isdir(private)
    if how == "kill":
        runner.cancel(Status.KILLED)
    thread.join(30)
    assert not thread.is_alive()
    expected = Status.KILLED if how == "kill" else Status.TIMED_OUT
    assert result == [expected]
    assert reporter.statuses["s.1"] is expected
    assert reporter.ran["t.1"] is False
    assert wait_dead(job_pid) and wait_dead(bg_pid)
    assert not os.path.exists(private)
    assert driver.transport is None


def test_background_children_do_not_hold_the_job_open(sshd, tmp_path, reporter):
    workspace = tmp_path / "ws"
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}', workspace: '{workspace}'}}\nstages: [s]\njobs:\n"
        "  - {stage: s, commands: ['sleep 600 &', 'echo $! > bg.pid', 'echo left']}\n"
    )
    runner, _ = make_runner(manifest, reporter, tmp_path, root_settings(sshd))
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    thread.join(60)
    assert result == [Status.PASSED]
    assert wait_dead(int((workspace / "bg.pid").read_text()))


def test_large_artifact_and_output_are_exact(sshd, tmp_path, reporter):
    workspace = tmp_path / "ws"
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}', workspace: '{workspace}'}}\nstages: [s]\njobs:\n"
        "  - stage: s\n    commands: ['head -c 9437283 /dev/urandom > big.bin', 'seq 1 200000']\n"
        "    artifacts: ['*.bin => *']\n"
    )
    runner, _ = make_runner(manifest, reporter, tmp_path, root_settings(sshd))
    assert runner.run() is Status.PASSED
    digest = hashlib.sha256((workspace / "big.bin").read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "artifacts" / "big.bin").read_bytes()).hexdigest() == digest
    expected = "".join(f"{i}\n" for i in range(1, 200001))
    assert "+ seq 1 200000\n" + expected + "Collected artifact big.bin => big.bin\n" in reporter.text("s.1")


def _command_lines() -> str:
    """Every process's command line on this machine (sshd runs here, so the build host's `ps` is ours)."""
    lines = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    lines.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return "\n".join(lines)


def test_masked_value_never_shows_in_dash_or_bash_traces_nor_in_ps(sshd, tmp_path, reporter):
    """The job's /bin/sh (dash) and a bash it starts trace the value; every quoting is masked, no argv holds it."""
    workspace = tmp_path / "ws"
    bash = "bash -xc " + shlex.quote("; ".join((*SECRET_COMMANDS[:-1], *BASH_SECRET_COMMANDS)))
    commands = [*SECRET_COMMANDS, bash, "sleep 300"]
    lines = "\n".join(f"      - {json.dumps(c)}" for c in commands)
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}', workspace: '{workspace}'}}\nstages: [s]\njobs:\n"
        f"  - stage: s\n    commands:\n{lines}\n"
    )
    variables = [Variable("SECRET", SECRET_VALUE, masked=True), Variable("ODD-NAME", "x")]
    runner, _ = make_runner(manifest, reporter, tmp_path, root_settings(sshd), variables=variables)
    result: list[Status] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    try:
        wait_for(lambda: "\n+ sleep 300\n" in reporter.text("s.1"), 60, lambda: reporter.text("s.1"))
        argv = _command_lines()
        assert "sleep 300" in argv  # the scan does see the job's processes
        for piece in SECRET_PIECES:
            assert piece not in argv, f"{piece!r} is on a command line"
    finally:
        runner.cancel()
        thread.join(60)
    assert result == [Status.KILLED]
    text = reporter.text("s.1")
    assert_no_secret(text)
    assert "+ printf '%q\\n'" in text  # bash ran and traced
    assert "'ODD-NAME' are not shell names" in reporter.text("create-driver")


def test_artifacts_through_symlinks_out_of_the_workspace_are_refused(sshd, tmp_path, reporter):
    workspace = tmp_path / "ws"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("canary\n")
    manifest = (
        f"driver: {{type: ssh, address: '{sshd.address}', workspace: '{workspace}'}}\nstages: [s]\njobs:\n"
        "  - stage: s\n"
        f"    commands: ['ln -s {outside} dirlink', 'ln -s {outside}/canary.txt filelink', 'echo in > real.txt',"
        " 'mkdir sub', 'ln -s ../real.txt sub/ok']\n"
        "    artifacts: [dirlink/canary.txt, filelink, 'dirlink/*.txt', ../outside/canary.txt, 'sub/ok => ok.txt']\n"
    )
    runner, _ = make_runner(manifest, reporter, tmp_path, root_settings(sshd))
    assert runner.run() is Status.PASSED, reporter.output
    text = reporter.text("s.1")
    for source in ("dirlink/canary.txt", "filelink", "dirlink/*.txt", "../outside/canary.txt"):
        assert f"djinn: artifact {source}: artifact source {source!r} leads outside the workspace" in text, text
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["ok.txt"]
    assert (tmp_path / "artifacts" / "ok.txt").read_text() == "in\n"


# --- the driver alone ---------------------------------------------------------


def test_cancel_aborts_a_connection_that_never_answers(tmp_path):
    """A server that accepts TCP but never speaks (qemu's user network before the guest's sshd)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        # Each attempt has its own bound: the deadline is honoured, several attempts are made.
        driver = SSHDriver({"address": address, "timeout": "3s"})
        with pytest.raises(DriverError, match=rf"could not connect to {address} \(user root\) within 3s: the server accepted the connection but sent no SSH banner$"):
            driver.create({}, lambda data: None)
        assert len(held) >= 2
        # cancel from another thread makes create return.
        driver = SSHDriver({"address": address, "timeout": "5m"})
        errors: list[BaseException] = []

        def create() -> None:
            try:
                driver.create({}, lambda data: None)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=create)
        thread.start()
        time.sleep(0.5)
        driver.cancel()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(errors[0], DriverError) and "cancelled" in str(errors[0])
        assert driver.execute("x", b"true\n", lambda d: None) < 0  # refused after cancel
        driver.destroy()
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for s in held:
            s.close()


def test_driver_api_on_an_attached_client(sshd, tmp_path):
    """What the qemu driver does: its own connect, then place/execute/collect/destroy."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(sshd.host, sshd.port, username="root", key_filename=str(sshd.key), look_for_keys=False, allow_agent=False)
    workspace = tmp_path / "ws"
    driver = SSHDriver({"workspace": str(workspace)})
    try:
        driver.attach(client, {"A": "1 2", "B": "x=y"})
        driver.place("sub/dir/f.txt", io.BytesIO(b"placed"), 0o640)
        assert stat.S_IMODE((workspace / "sub/dir/f.txt").stat().st_mode) == 0o640
        out: list[bytes] = []
        assert driver.execute("j", b"#!/bin/sh\necho \"$A|$B\"; cat sub/dir/f.txt; exit 7\n", out.append) == 7
        assert b"".join(out) == b"1 2|x=y\nplaced"
        assert driver.run_command("echo hi") == (0, b"hi\n")
        found = [(p, s.read()) for p, s in driver.collect("sub/*/*.txt")]
        assert found == [("sub/dir/f.txt", b"placed")]
        assert list(driver.collect("sub/dir/nope")) == []
    finally:
        driver.destroy()
        driver.destroy()  # idempotent
    assert not client.get_transport().is_active()


def test_settings_parsing():
    assert parse_address("example.com") == ("example.com", 22)
    assert parse_address("10.0.0.1:2222") == ("10.0.0.1", 2222)
    assert parse_address("[::1]:2200") == ("::1", 2200)
    with pytest.raises(DriverError, match="needs an address"):
        parse_address("")
    with pytest.raises(DriverError, match="invalid ssh address"):
        parse_address("host:notaport")
    with pytest.raises(DriverError, match="invalid ssh address ':22': the host is missing"):
        parse_address(":22")
    assert SSHDriver({"timeout": "1m30s"}).timeout == 90
    assert SSHDriver({"timeout": datetime.timedelta(seconds=90)}).timeout == 90
    with pytest.raises(DriverError, match=r"^ssh driver: manifest: driver\.timeout: invalid duration 'soon'"):
        SSHDriver({"timeout": "soon"})
    with pytest.raises(DriverError, match="timeout: must be a positive duration"):
        SSHDriver({"timeout": "-5s"})
    # The driver config's block, overridden by the manifest's map.
    configured = SSHSettings(timeout=datetime.timedelta(seconds=5), user="ci", key="/k")
    driver = SSHDriver({"address": "h", "user": "deploy"}, configured=configured)
    assert (driver.user, driver.password, driver.key_file, driver.timeout, driver.settings.address) == ("deploy", None, "/k", 5, "h")
    driver = SSHDriver(configured=DriverConfig.defaults().settings_for("ssh"))
    assert (driver.user, driver.password, driver.key_file, driver.timeout) == ("root", None, None, SSHSettings().timeout.total_seconds())


def test_check_at_start_up(sshd, tmp_path):
    SSHDriver.check(DriverConfig.defaults().settings_for("ssh"))
    SSHDriver.check({"key": str(sshd.key), "timeout": "30s"})
    with pytest.raises(DriverError, match="cannot read the ssh driver's key .*nope"):
        SSHDriver.check({"key": str(tmp_path / "nope")})
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(DriverError, match="is not a private key"):
        SSHDriver.check({"key": str(tmp_path / "junk")})
