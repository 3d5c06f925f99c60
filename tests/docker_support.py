"""Fixtures for tests against a real Docker engine.

The engine and the test image are brought up by the project's own scripts
(scripts/docker-engine, scripts/docker-test-image), so the tests work on a fresh
machine: they install docker.io, start dockerd and build the image when needed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import docker
import pytest
import requests
from waiting import wait_for  # noqa: F401  (tests import it from here too)

from djinn.drivers.docker import BUILD_LABEL, WORKER_LABEL

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "djinn-test/busybox:latest"


def _script(name: str, *args: str) -> None:
    res = subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"scripts/{name} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")


@pytest.fixture(scope="session")
def docker_api() -> Iterator[docker.APIClient]:
    """A client of a running engine that has the test image."""
    _script("docker-engine")
    _script("docker-test-image", IMAGE)
    api = docker.APIClient(version="auto")
    yield api
    api.close()


def labelled(api: docker.APIClient, build: str | None = None, worker: str | None = None) -> dict[str, list[str]]:
    """Containers (any state) and volumes the engine has with djinn's labels for this build/worker."""
    labels = [f"{BUILD_LABEL}={build}" if build is not None else BUILD_LABEL]
    if worker is not None:
        labels.append(f"{WORKER_LABEL}={worker}")
    containers = [c["Id"] for c in api.containers(all=True, filters={"label": labels})]
    volumes = [v["Name"] for v in api.volumes(filters={"label": labels}).get("Volumes") or []]
    return {"containers": containers, "volumes": volumes}


NOTHING = {"containers": [], "volumes": []}




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path_factory) -> Iterator[str]:
    """A real image registry (Debian's docker-registry) on a free loopback port; yields host:port.

    The engine treats 127.0.0.0/8 registries as insecure by default, so plain HTTP works
    and nothing leaves the machine.
    """
    if shutil.which("docker-registry") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-registry"]):
            subprocess.run(argv, check=True, capture_output=True, env=env, timeout=600)
    root = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{_free_port()}"
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: '{address}'}}\n"
    )
    with open(root / "registry.log", "wb") as logfile:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=logfile, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            assert proc.poll() is None, (root / "registry.log").read_text()
            try:
                return requests.get(f"http://{address}/v2/", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(answers, 30, "the registry to answer")
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
