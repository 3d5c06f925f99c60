"""The `djinn` offline runner, run as a user runs it: a real process in a directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

DJINN = shutil.which("djinn", path=os.path.dirname(sys.executable)) or "djinn"


def djinn(*args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DJINN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BUILD = """
driver: {type: os}
env: ["MSG=hi there=you"]
objects: ["in.txt => input/in.txt"]
stages: [build, test, docs]
allow_failures: [docs]
jobs:
  - stage: build
    commands: ["cat input/in.txt > out.txt", "echo \\"$MSG\\" >> out.txt"]
    artifacts: ["out.txt => result.txt"]
  - stage: test
    name: Check Output
    commands: ["grep 'hi there=you' out.txt"]
  - stage: docs
    commands: ["exit 1"]
"""


def test_default_manifest_objects_artifacts_and_output(tmp_path):
    write(tmp_path / ".djinn.yml", BUILD)
    write(tmp_path / "objs" / "in.txt", "from object\n")
    res = djinn("-objects", "objs", "--artifacts", "arts", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "==> Running job check-output (test)" in res.stdout
    assert "hi there=you out.txt\nhi there=you\n" in res.stdout
    assert "==> Job docs.1 passed_with_failures" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1] == "==> Build passed_with_failures"
    assert (tmp_path / "arts" / "result.txt").read_text() == "from object\nhi there=you\n"


def test_failed_build_exits_1(tmp_path):
    write(tmp_path / "m.yml", "driver: {type: os}\nstages: [a, b]\njobs:\n  - {stage: a, commands: ['exit 2']}\n  - {stage: b, commands: ['echo nope']}\n")
    res = djinn("-manifest", "m.yml", cwd=tmp_path)
    assert res.returncode == 1
    assert "==> Build failed" in res.stdout
    assert "nope" not in res.stdout


def test_stage_flag_runs_setup_and_that_stage_only(tmp_path):
    write(tmp_path / "m.yml", "driver: {type: os}\nstages: [a, b, c]\njobs:\n"
          "  - {stage: a, commands: ['echo ran-a']}\n  - {stage: b, commands: ['echo ran-b']}\n  - {stage: c, commands: ['echo ran-c']}\n")
    res = djinn("-manifest", "m.yml", "-stage", "b", cwd=tmp_path)
    assert res.returncode == 0
    assert "==> Running job create-driver (setup)" in res.stdout
    assert "\nran-b\n" in res.stdout
    assert "ran-a\n" not in res.stdout.replace("echo ran-a", "") and "\nran-c" not in res.stdout
    bad = djinn("-manifest", "m.yml", "-stage", "zz", cwd=tmp_path)
    assert bad.returncode == 2
    assert "no stage named 'zz'" in bad.stderr


def test_invalid_manifest_exits_2_with_message(tmp_path):
    write(tmp_path / ".djinn.yml", "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: b, commands: [x]}\n")
    res = djinn(cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "djinn: .djinn.yml: line 4: jobs[0].stage: stage 'b' is not declared in stages"
    assert "Traceback" not in res.stderr


def test_missing_manifest_and_bad_flags_exit_2(tmp_path):
    res = djinn(cwd=tmp_path)
    assert res.returncode == 2 and "no such file" in res.stderr
    res = djinn("-bogus", cwd=tmp_path)
    assert res.returncode == 2 and "unrecognized arguments: -bogus" in res.stderr


def test_bad_driver_config_exits_2_naming_file_and_line(tmp_path):
    write(tmp_path / ".djinn.yml", "driver: {type: os}\n")
    write(tmp_path / "driver.conf", "driver qemu {\n  cpus 2\n  memory \"lots\"\n}\n")
    res = djinn("-driver", "driver.conf", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr == 'djinn: driver.conf:3: driver.qemu.memory: expected an integer, got string "lots"\n'
    res = djinn("-driver", "missing.conf", cwd=tmp_path)
    assert res.returncode == 2 and "missing.conf" in res.stderr


def test_timeout_flag_gives_timed_out(tmp_path):
    write(tmp_path / ".djinn.yml", "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 300']}\n")
    res = djinn("-timeout", "1s", cwd=tmp_path)
    assert res.returncode == 1
    assert "==> Build timed_out" in res.stdout


def test_secret_flag_masks_value(tmp_path):
    write(tmp_path / ".djinn.yml", "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo token is $TOKEN']}\n")
    res = djinn("-secret", "TOKEN=abc123xyz", cwd=tmp_path)
    assert res.returncode == 0
    assert "abc123xyz" not in res.stdout
    assert "token is xxxxxx" in res.stdout


def test_ctrl_c_kills_build_cleanly(tmp_path):
    pidfile = tmp_path / "pid"
    write(tmp_path / ".djinn.yml", f"driver: {{type: os}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['echo $$ > {pidfile}; echo ready', 'sleep 300']}}\n")
    proc = subprocess.Popen([DJINN], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "ready":
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert rest.rstrip().splitlines()[-1] == "==> Build killed"
    assert "==> Job a.1 killed" in rest
    # The job's shell is gone and the build directory removed.
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists()
    workspace = next(line for line in lines if "Running with OS driver in" in line).split(" in ")[1].rstrip(".\n")
    assert not Path(workspace).exists()


def test_help_lists_flags(tmp_path):
    res = djinn("--help", cwd=tmp_path)
    assert res.returncode == 0
    for flag in ("-manifest", "-driver", "-objects", "-artifacts", "-stage"):
        assert flag in res.stdout


OS_BUILD = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo ran']}\n"


def test_version_flag(tmp_path):
    from importlib.metadata import version

    for flag in ("-version", "--version"):
        res = djinn(flag, cwd=tmp_path)
        assert res.returncode == 0 and res.stderr == ""
        assert res.stdout.startswith(f"djinn {version('djinn-worker')} linux/")


def test_driver_config_default_is_cwd_file_then_xdg_then_home_config(tmp_path):
    write(tmp_path / "work" / ".djinn.yml", OS_BUILD)
    # A warning names the file that was read: each candidate gets an ignored key of its own.
    write(tmp_path / "xdg" / "djinn" / "driver.conf", "driver os {}\nfrom_xdg 1\n")
    write(tmp_path / "home" / ".config" / "djinn" / "driver.conf", "driver os {}\nfrom_home 1\n")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    res = djinn(cwd=tmp_path / "work", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith(f'djinn: warning: {tmp_path / "xdg" / "djinn" / "driver.conf"}:2: unknown key "from_xdg"')

    res = djinn(cwd=tmp_path / "work", env={**env, "XDG_CONFIG_HOME": ""})
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith(f'djinn: warning: {tmp_path / "home" / ".config" / "djinn" / "driver.conf"}:2: unknown key "from_home"')

    write(tmp_path / "work" / "djinn-driver.conf", "driver os {}\nfrom_cwd 1\n")
    res = djinn(cwd=tmp_path / "work", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith('djinn: warning: djinn-driver.conf:2: unknown key "from_cwd"')

    res = djinn("-driver", str(tmp_path / "xdg" / "djinn" / "driver.conf"), cwd=tmp_path / "work", env=env)
    assert "from_xdg" in res.stderr and "from_cwd" not in res.stderr


def test_overflowing_timeout_is_one_line_exit_2(tmp_path):
    write(tmp_path / ".djinn.yml", OS_BUILD)
    for value, message in [
        ("9999999999999d", "invalid duration '9999999999999d': unit 'd' is not in upstream's config language"),
        ("99999999999999999999h", "duration 99999999999999999999h is out of range"),
        ("0s", "-timeout 0s: must be a positive duration"),
    ]:
        res = djinn("-timeout", value, cwd=tmp_path)
        assert res.returncode == 2, res.stdout
        assert res.stderr.startswith(f"djinn: {message}"), res.stderr
        assert len(res.stderr.splitlines()) == 1


def test_secret_named_alone_takes_its_value_from_the_environment(tmp_path):
    write(tmp_path / ".djinn.yml", "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo token is $TOKEN']}\n")
    res = djinn("-secret", "TOKEN", cwd=tmp_path, env={**os.environ, "TOKEN": "env-secret-987"})
    assert res.returncode == 0, res.stderr
    assert "token is xxxxxx" in res.stdout and "env-secret-987" not in res.stdout
    res = djinn("-secret", "UNSET_TOKEN_FOR_TEST", cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "UNSET_TOKEN_FOR_TEST"})
    assert res.returncode == 2
    assert res.stderr == "djinn: -secret UNSET_TOKEN_FOR_TEST: no '=' and no environment variable UNSET_TOKEN_FOR_TEST to take the value from\n"
    res = djinn("-env", "NOEQUALS", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr == "djinn: -env 'NOEQUALS': expected KEY=VALUE\n"


def test_closed_output_pipe_ends_quietly_and_the_build_still_finishes(tmp_path):
    write(
        tmp_path / ".djinn.yml",
        "driver: {type: os}\nstages: [a]\njobs:\n  - stage: a\n    commands:\n"
        "      - for i in $(seq 1 3000); do echo line $i; done\n      - echo done > out.txt\n"
        "    artifacts: [out.txt]\n",
    )
    proc = subprocess.Popen([DJINN], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"==> Running stage")
    proc.stdout.close()  # as `djinn | head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(120) == 0
    assert stderr == ""
    assert (tmp_path / "out.txt").read_text() == "done\n"


def test_unknown_manifest_keys_warn_and_the_build_runs(tmp_path):
    """As upstream: a key the runner does not know is ignored; the user is told which, and where."""
    write(tmp_path / ".djinn.yml", "driver: {type: os}\nbuild_timeout: 10m\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo ran-anyway']}\n")
    res = djinn(cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ran-anyway" in res.stdout
    (line,) = [text for text in res.stderr.splitlines() if "warning" in text]
    assert line.startswith("djinn: warning: ") and ".djinn.yml: line 2: build_timeout: unknown key" in line, res.stderr
