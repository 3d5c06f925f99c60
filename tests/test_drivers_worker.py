"""The docker, ssh and qemu drivers run through the worker daemon (real worker processes)."""

from __future__ import annotations

import hashlib

import docker
from docker_support import IMAGE, NOTHING, labelled, wait_for

TWO_JOBS = """
driver:
  {driver}
env: ["SPACED=a b=c"]
stages: [make, check]
jobs:
  - stage: make
    commands: ["echo \\"$SPACED\\" > shared.txt", "printf 'artifact' > art.bin"]
    artifacts: ["art.bin => out.bin"]
  - stage: check
    commands: ["cat shared.txt"]
"""


def check_two_jobs(env, build_id: int) -> None:
    info = env.wait_status(build_id, timeout=120)
    assert info["status"] == "passed", env.log_tail()
    assert [j["status"] for j in info["jobs"]] == ["passed", "passed", "passed"]
    (output,) = env.sql("SELECT output FROM build_jobs WHERE build_id = :id AND name = 'check.1'", id=build_id)[0]
    assert "a b=c\n" in output
    assert info["artifacts"] == [{"name": "out.bin", "size": 8, "sha256": hashlib.sha256(b"artifact").hexdigest()}]
    ((user_id, hash_),) = env.sql("SELECT user_id, hash FROM build_artifacts WHERE build_id = :id", id=build_id)
    assert (env.root / "artifacts" / str(user_id) / hash_).read_bytes() == b"artifact"


def test_docker_build_through_worker(worker_env, docker_api):
    worker_env.write_config(driver="docker", driver_config="driver docker {}\n")
    worker_env.start_worker()
    build_id = worker_env.submit(TWO_JOBS.format(driver=f"{{type: docker, image: '{IMAGE}', workspace: /build}}"))
    check_two_jobs(worker_env, build_id)
    assert labelled(docker_api, str(build_id)) == NOTHING

    # Killed through the worker: nothing of the build is left on the engine.
    build_id = worker_env.submit(
        f"driver: {{type: docker, image: '{IMAGE}', workspace: /build}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['sleep 60']}}\n"
    )
    wait_for(lambda: labelled(docker_api, str(build_id))["containers"], 60, "the job's container")
    worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id, timeout=20)["status"] == "killed"
    assert labelled(docker_api, str(build_id)) == NOTHING


def test_worker_start_up_sweeps_docker_leftovers(worker_env, docker_api):
    worker_env.write_config(driver="docker", driver_config="driver docker {}\n")
    client = docker.from_env()
    leftover = client.containers.create(IMAGE, "true", labels={"djinn.build": "999999", "djinn.worker": "dead:1"})
    volume = client.volumes.create("djinn-999999-leftover", labels={"djinn.build": "999999", "djinn.worker": "dead:1"})
    try:
        worker_env.start_worker()
        wait_for(lambda: labelled(docker_api, "999999") == NOTHING, 30, "the start-up sweep")
    finally:
        for remove in (lambda: leftover.remove(force=True), lambda: volume.remove(force=True)):
            try:
                remove()
            except docker.errors.NotFound:
                pass


def test_ssh_build_through_worker(worker_env, sshd):
    worker_env.write_config(driver="ssh", driver_config=f'driver ssh {{\n    timeout 10s\n    user "root"\n    key "{sshd.key}"\n}}\n')
    worker_env.start_worker()
    build_id = worker_env.submit(TWO_JOBS.format(driver=f"{{type: ssh, address: '{sshd.address}', workspace: '{worker_env.root}/ssh-ws'}}"))
    check_two_jobs(worker_env, build_id)
    failing = worker_env.submit(
        f"driver: {{type: ssh, address: '{sshd.address}'}}\nstages: [a]\njobs:\n  - {{stage: a, commands: ['exit 7']}}\n"
    )
    assert worker_env.wait_status(failing, timeout=60)["status"] == "failed"


def test_qemu_build_through_worker(worker_env, qemu_image):
    disks = qemu_image.disks_with(worker_env.root)
    worker_env.write_config(
        driver="qemu", driver_config=f'driver qemu {{\n    disks "{disks}"\n    cpus 1\n    memory 512\n}}\n'
    )
    worker_env.start_worker()
    before = hashlib.sha256(qemu_image.path.read_bytes()).hexdigest()
    build_id = worker_env.submit(TWO_JOBS.format(driver="{type: qemu, image: djinn-test}"))
    check_two_jobs(worker_env, build_id)
    assert hashlib.sha256(qemu_image.path.read_bytes()).hexdigest() == before
    wait_for(lambda: not _qemu_running(disks), 20, "the VM to be gone")


def _qemu_running(disks) -> bool:
    import subprocess

    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return str(disks) in out
