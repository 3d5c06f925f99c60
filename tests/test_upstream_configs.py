"""Config files laid out and written as upstream's (djinn-ci/djinn dist/ and integration/testdata/), through `-check`.

The fixtures under tests/fixtures/upstream_style are this project's own text
using every construct upstream's published files use: includes relative to the
working directory, bare labels (`provider github`), labelled blocks, `${VAR}`,
durations (`45m`, `1h30m`) and sizes (`8MB`, plain byte counts), commented-out
blocks. Each is run from the directory upstream runs its files from, and the
effective settings are the ones upstream's decoder produces for the same text
(checked against it), plus this worker's defaults for what upstream leaves unset.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from worker_support import WORKER

FIXTURES = Path(__file__).parent / "fixtures" / "upstream_style"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES, tmp_path / "upstream", dirs_exist_ok=True)
    return tmp_path / "upstream"


def check(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FX_DB_PASSWORD": "pw-fx"}
    return subprocess.run([WORKER, *args, "-check"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_integration_layout_includes_resolve_against_the_working_directory(tree):
    # As upstream's integration tests: run from integration/, the includes name testdata/conf.d/...
    res = check(tree / "integration", "-config", "testdata/worker.conf", "-driver", "testdata/driver.conf")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert json.loads(res.stdout) == {
        "pidfile": None,
        "log": {"level": "debug", "file": "testdata/log/worker.log"},
        "parallelism": 3,
        "driver": "os",
        "queue": "builds_os",
        "timeout": 45 * 60,
        "orphan_timeout": 120,
        "metrics": None,
        "host": None,
        "providers": {},
        "crypto_set": True,
        "database": {
            "addr": "127.0.0.1:5432",
            "name": "djinn_it",
            "username": "ci_worker",
            "password_set": True,
            "tls": None,
        },
        "redis": {"addr": "127.0.0.1:6390", "password_set": False},
        "smtp": {"addr": "127.0.0.1:2525", "admin": "ci@localhost", "ca": None, "username": None, "password_set": False},
        "store": {
            "artifacts": {"type": "file", "path": "/tmp/fx/artifacts", "limit": 0},
            "objects": {"type": "file", "path": "/tmp/fx/objects", "limit": 8 << 20},
            "images": {"type": "file", "path": "/tmp/fx/images", "limit": 0},
        },
        "drivers": {"os": {}},
    }
    assert "pw-fx" not in res.stdout


def test_integration_layout_also_works_from_elsewhere_when_relative_to_the_file(tree, tmp_path):
    # This worker's own rule first: paths relative to the including file.
    worker = tree / "integration" / "testdata" / "worker.conf"
    worker.write_text(worker.read_text().replace('"testdata/conf.d/', '"conf.d/'))
    res = check(tmp_path, "-config", str(worker), "-driver", str(worker.parent / "driver.conf"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["store"]["objects"]["limit"] == 8 << 20


def test_missing_include_names_both_places_looked(tree, tmp_path):
    res = check(tmp_path, "-config", str(tree / "integration" / "testdata" / "worker.conf"), "-driver", "x.conf")
    assert res.returncode == 2
    assert res.stderr.startswith(f"djinn-worker: {tree / 'integration' / 'testdata' / 'worker.conf'}:12: cannot include 'testdata/conf.d/crypto.conf': no such file")
    assert len(res.stderr.splitlines()) == 1


def test_dist_layout_with_bare_labels_commented_blocks_and_byte_counts(tree):
    res = check(tree / "dist", "-config", "worker.conf", "-driver", "driver-unquoted.conf")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    settings = json.loads(res.stdout)
    assert settings == {
        "pidfile": "/run/djinn/ci-worker.pid",
        "log": {"level": "info", "file": "/var/log/djinn/ci-worker.log"},
        "parallelism": os.cpu_count(),
        "driver": "qemu-x86_64",
        "queue": "builds_qemu-x86_64",
        "timeout": 90 * 60,
        "orphan_timeout": 120,
        "metrics": None,
        "host": None,
        # Upstream's decoder drops a bare label's entry; this worker keeps it with the
        # provider's default endpoint, which is what upstream's dist file means.
        "providers": {
            "github": {
                "endpoint": "https://api.github.com",
                "oauth2_endpoint": None,
                "client_id": None,
                "secret_set": False,
                "client_secret_set": False,
            },
            "gitlab": {
                "endpoint": "https://gitlab.com/api/v4",
                "oauth2_endpoint": None,
                "client_id": None,
                "secret_set": False,
                "client_secret_set": False,
            },
        },
        "crypto_set": True,
        "database": {
            "addr": "db.example.org:5432",
            "name": "djinn",
            "username": "djinn_worker",
            "password_set": True,
            "tls": None,
        },
        "redis": {"addr": "redis.example.org:6379", "password_set": False},
        "smtp": {
            "addr": "mail.example.org:587",
            "admin": "builds@example.org",
            "ca": "/etc/ssl/certs/ca-certificates.crt",
            "username": "builds@example.org",
            "password_set": True,
        },
        "store": {
            "artifacts": {"type": "file", "path": "/srv/djinn/artifacts", "limit": 104857600},
            "objects": {"type": "file", "path": "/srv/djinn/objects", "limit": 0},
            "images": None,
        },
        "drivers": {
            "docker": {"host": "unix:///run/docker.sock", "version": "1.41"},
            "qemu": {"disks": "/srv/djinn/images", "cpus": 2, "memory": 4096, "accel": "auto", "warm": True, "warm_limit": 8589934592},
            "ssh": {"timeout": 45, "user": "builder", "key": None, "password_set": False},
        },
    }
    for secret in ("pw-fx", "mail-pw", "abcdefghijklmnop", "ponmlkjihgfedcba"):
        assert secret not in res.stdout


def test_dist_driver_file_with_a_quoted_duration_works_and_warns(tree):
    # Upstream's own dist/driver.conf quotes the ssh timeout, which its decoder refuses.
    res = check(tree / "dist", "-config", "worker.conf", "-driver", "driver.conf")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["drivers"]["ssh"]["timeout"] == 45
    assert res.stderr == (
        "djinn-worker: warning: driver.conf:5: driver.ssh.timeout: a duration in quotes works here, "
        "but upstream's djinn-worker refuses it; write it without quotes\n"
    )
