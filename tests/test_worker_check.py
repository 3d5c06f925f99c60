"""`djinn-worker -check`: validate config files and print the effective settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

WORKER = shutil.which("djinn-worker", path=os.path.dirname(sys.executable)) or "djinn-worker"

CONFIG = """\
# upstream-style worker config
pidfile "/run/djinn/worker.pid"
log debug "/var/log/djinn/worker.log"
parallelism 3
driver "{driver}"
timeout 45m

provider github {{}}
provider gitlab {{
\tendpoint "https://gitlab.example.com/api/v4"
}}

crypto {{
\tblock "0123456789abcdef"
\tsalt  "pepper-and-salt"
}}

database {{
\taddr     "db.internal:5432"
\tname     "djinn"
\tusername "worker"
\tpassword "${{DJINN_TEST_DB_PASSWORD}}"
}}

redis {{
\taddr     "redis.internal:6379"
\tpassword "redis-secret-pw"
}}

smtp {{
\taddr     "smtp.example.com:587"
\tadmin    "ci@example.com"
\tusername "mailer"
\tpassword "smtp-secret-pw"
}}

store artifacts {{
\ttype  "file"
\tpath  "/srv/djinn/artifacts"
\tlimit 10MB
}}

store objects {{
\ttype "file"
\tpath "/srv/djinn/objects"
}}
"""

DRIVERS = """\
driver docker {
\thost    "unix:///var/run/docker.sock"
\tversion "1.41"
}
driver qemu {
\tdisks  "/var/lib/djinn/images"
\tcpus   2
\tmemory 4096
}
driver ssh {
\ttimeout 30s
\tuser    "builder"
}
"""


def check(tmp_path: Path, config: str, drivers: str = DRIVERS) -> subprocess.CompletedProcess[str]:
    (tmp_path / "worker.conf").write_text(config)
    (tmp_path / "driver.conf").write_text(drivers)
    env = {**os.environ, "DJINN_TEST_DB_PASSWORD": "db-secret-pw"}
    return subprocess.run(
        [WORKER, "-config", "worker.conf", "--driver", "driver.conf", "-check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


def test_check_prints_effective_settings(tmp_path):
    res = check(tmp_path, CONFIG.format(driver="docker"))
    assert res.returncode == 0, res.stderr
    settings = json.loads(res.stdout)
    assert settings == {
        "pidfile": "/run/djinn/worker.pid",
        "log": {"level": "debug", "file": "/var/log/djinn/worker.log"},
        "parallelism": 3,
        "driver": "docker",
        "queue": "builds_docker",
        "timeout": 2700,
        "orphan_timeout": 120,
        "metrics": None,
        "host": None,
        "providers": {
            "github": {
                "endpoint": "https://api.github.com",
                "oauth2_endpoint": None,
                "client_id": None,
                "secret_set": False,
                "client_secret_set": False,
            },
            "gitlab": {
                "endpoint": "https://gitlab.example.com/api/v4",
                "oauth2_endpoint": None,
                "client_id": None,
                "secret_set": False,
                "client_secret_set": False,
            },
        },
        "crypto_set": True,
        "database": {"addr": "db.internal:5432", "name": "djinn", "username": "worker", "password_set": True, "tls": None},
        "redis": {"addr": "redis.internal:6379", "password_set": True},
        "smtp": {
            "addr": "smtp.example.com:587",
            "admin": "ci@example.com",
            "ca": None,
            "username": "mailer",
            "password_set": True,
        },
        "store": {
            "artifacts": {"type": "file", "path": "/srv/djinn/artifacts", "limit": 10 * 1024 * 1024},
            "objects": {"type": "file", "path": "/srv/djinn/objects", "limit": 0},
            "images": None,
        },
        "drivers": {
            "docker": {"host": "unix:///var/run/docker.sock", "version": "1.41"},
            "qemu": {"disks": "/var/lib/djinn/images", "cpus": 2, "memory": 4096, "accel": "auto", "warm": True, "warm_limit": 8589934592},
            "ssh": {"timeout": 30, "user": "builder", "key": None, "password_set": False},
        },
    }
    for secret in ("db-secret-pw", "redis-secret-pw", "smtp-secret-pw", "pepper-and-salt", "0123456789abcdef"):
        assert secret not in res.stdout


def test_qemu_queue_and_cpu_parallelism(tmp_path):
    for driver in ("qemu", "qemu-x86_64"):
        res = check(tmp_path, CONFIG.format(driver=driver).replace("parallelism 3", "parallelism 0"))
        assert res.returncode == 0, res.stderr
        settings = json.loads(res.stdout)
        assert settings["queue"] == "builds_qemu-x86_64"
        assert settings["parallelism"] == os.cpu_count()


def test_bad_file_exits_2_with_file_and_line(tmp_path):
    res = check(tmp_path, CONFIG.format(driver="docker").replace("parallelism 3", '\nparallelism "three"'))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr == 'djinn-worker: worker.conf:5: parallelism: expected an integer, got string "three"\n'
    assert "Traceback" not in res.stderr


def test_unknown_keys_and_ssl_warn_on_stderr_and_check_still_passes(tmp_path):
    config = CONFIG.format(driver="docker").replace("parallelism 3", "parallelism 3\nparalelism 4")
    config = config.replace('\tpassword "${DJINN_TEST_DB_PASSWORD}"\n', '\tpassword "${DJINN_TEST_DB_PASSWORD}"\n\tssl {\n\t\tca "/ca.crt"\n\t}\n')
    res = check(tmp_path, config, DRIVERS.replace('\tcpus   2\n', '\tcpus   2\n\tsockets 4\n'))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["database"]["tls"] == {"ca": "/ca.crt", "cert": None, "key": None}
    lines = res.stderr.splitlines()
    assert lines[0].startswith('djinn-worker: warning: worker.conf:5: unknown key "paralelism" ignored')
    assert "djinn-worker: warning: worker.conf:24: database.ssl is deprecated, use tls instead (read as tls)" in lines
    assert any(line.startswith('djinn-worker: warning: driver.conf:8: unknown key "sockets" in driver.qemu ignored') for line in lines)
    assert len(lines) == 3


def test_unknown_driver_and_missing_driver_block(tmp_path):
    res = check(tmp_path, CONFIG.format(driver="podman"))
    assert res.returncode == 2 and "worker.conf:" in res.stderr and "podman" in res.stderr
    res = check(tmp_path, CONFIG.format(driver="docker"), drivers="driver ssh {\n\tuser \"x\"\n}\n")
    assert res.returncode == 2 and "no 'driver docker' block" in res.stderr


def test_syntax_error_in_driver_file(tmp_path):
    res = check(tmp_path, CONFIG.format(driver="docker"), drivers="driver docker {\n\thost \"unterminated\n}\n")
    assert res.returncode == 2
    assert "driver.conf:2:" in res.stderr


def test_overflow_and_deep_nesting_are_one_line_exit_2(tmp_path):
    base = CONFIG.format(driver="docker")
    cases = [
        (base.replace("timeout 45m", "timeout 99999999999999999999d"), "worker.conf:6: invalid duration '99999999999999999999d': unit 'd'"),
        (base.replace("timeout 45m", "timeout 99999999999999999999h"), "worker.conf:6: duration 99999999999999999999h is out of range"),
        (base.replace("limit 10MB", "limit " + "9" * 400 + "MB"), "worker.conf:40: size 9999"),
        (base.replace("limit 10MB", "limit " + "9" * 400), "worker.conf:40: integer 9999"),
        (base.replace("parallelism 3", "parallelism " + "7" * 5000), "worker.conf:4: integer 7777"),
        (base + "deep " + "{ x " * 10000 + "}" * 10000 + "\n", "worker.conf:47: blocks and arrays are nested more than 64 deep"),
    ]
    for config, message in cases:
        res = check(tmp_path, config)
        assert res.returncode == 2, res.stdout
        assert res.stdout == ""
        assert res.stderr.startswith(f"djinn-worker: {message}"), res.stderr[:300]
        assert len(res.stderr.splitlines()) == 1 and len(res.stderr) < 400
