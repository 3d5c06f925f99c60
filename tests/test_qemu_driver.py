"""The qemu driver booting real QEMU virtual machines (tests/qemu_support.py builds the image).

Each full boot costs seconds under TCG, so the suite boots few VMs: one build
through the offline runner, two builds at once that are then killed, and two
boots cut short by timeouts. The other tests start no guest at all.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import RecordingReporter
from qemu_support import QemuImage, listening, pid_alive, qemu_processes, sha256, wait_for

import djinn.drivers.qemu as qemu_module
from djinn.drivers.qemu import QEMUDriver
from djinn.errors import DriverError
from djinn.manifest import parse_manifest
from djinn.plan import plan_build
from djinn.runner.engine import Runner, Variable
from djinn.runner.store import DirectoryArtifacts, DirectoryObjects
from djinn.status import Status

DJINN = shutil.which("djinn", path=str(Path(sys.executable).parent)) or "djinn"
MEMORY = 512  # MiB: plenty for the test image, and two VMs at once stay small
BOOT = 300  # seconds a test waits at most for a guest (TCG on a loaded 2-core machine)


def expected_accel() -> str:
    """What accel auto must pick here: KVM only with vmx/svm advertised (a bare /dev/kvm hangs guests)."""
    with open("/proc/cpuinfo") as f:
        flags = re.search(r"\b(vmx|svm)\b", f.read())
    return "kvm" if flags and qemu_module.kvm_usable() else "tcg"


def settings(disks: Path, image: str = "djinn-test", **extra) -> dict:
    return {"type": "qemu", "image": image, "disks": str(disks), "cpus": 1, "memory": MEMORY, "accel": "auto", **extra}


def make_runner(manifest: str, driver: QEMUDriver, reporter, tmp_path: Path, **kwargs) -> Runner:
    m = parse_manifest(manifest)
    return Runner(
        plan_build(m),
        driver,
        variables=[Variable(k, v) for k, v in m.env],
        objects=DirectoryObjects(tmp_path / "objects"),
        artifacts=DirectoryArtifacts(tmp_path / "artifacts"),
        reporter=reporter,
        **kwargs,
    )


BUILD = """
driver: {type: qemu, image: nested/djinn-test}
env: ["GREETING=hello from the host"]
objects: ["in.txt => input/in.txt"]
stages: [make, check]
jobs:
  - stage: make
    commands:
      - cat input/in.txt > made.txt
      - echo "$GREETING" >> made.txt
    artifacts: ["made.txt => result.txt"]
  - stage: check
    commands:
      - cat made.txt
      - test "$(hostname)" = djinn-test
"""


def test_build_through_offline_runner(qemu_image: QemuImage, tmp_path):
    """Boots the image (a name with /), runs two jobs sharing files, collects an artifact, leaves nothing."""
    disks = qemu_image.disks_with(tmp_path, "nested/djinn-test")
    before = sha256(qemu_image.path)
    (tmp_path / "objs").mkdir()
    (tmp_path / "objs" / "in.txt").write_text("from an object\n")
    (tmp_path / ".djinn.yml").write_text(BUILD)
    # warm false: this build boots cold in snapshot mode and keeps no saved machine state.
    (tmp_path / "driver.conf").write_text(f'driver qemu {{\n  disks "{disks}"\n  cpus 1\n  memory {MEMORY}\n  warm false\n}}\n')
    res = subprocess.run(
        [DJINN, "-driver", "driver.conf", "-objects", "objs", "-artifacts", "arts"],
        cwd=tmp_path, capture_output=True, text=True, timeout=BOOT + 120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert f"Booting machine with image nested/djinn-test ({expected_accel()}, 1 CPU, {MEMORY} MiB)" in out
    assert "Established SSH connection to machine as root" in out
    # The second job sees the first job's file, the object and the build environment.
    assert "+ cat made.txt\nfrom an object\nhello from the host\n" in out
    assert out.rstrip().splitlines()[-1] == "==> Build passed"
    assert (tmp_path / "arts" / "result.txt").read_text() == "from an object\nhello from the host\n"
    # Snapshot mode: the base image is byte-identical; and the VM is gone.
    assert sha256(qemu_image.path) == before
    assert not (disks / "_warm").exists()
    assert qemu_processes(str(disks)) == []


LONG_JOB = """
driver: {type: qemu, image: djinn-test}
stages: [run]
jobs:
  - stage: run
    commands:
      - echo "ready $(hostname) $(id -un)"
      - sleep 600
      - echo never
"""


def test_two_builds_at_once_get_their_own_vm_and_port_and_die_on_kill(qemu_image: QemuImage, tmp_path):
    """Two VMs boot concurrently on different ports (one logs in with the key, one with the empty
    password); killing the builds mid-job kills both VMs and frees their ports."""
    disks = qemu_image.disks_with(tmp_path)
    before = sha256(qemu_image.path)
    builds = []
    for name, extra in (("key", {"key": str(qemu_image.key)}), ("empty-password", {})):
        reporter = RecordingReporter()
        driver = QEMUDriver(settings(disks, **extra))
        runner = make_runner(LONG_JOB, driver, reporter, tmp_path / name)
        result: dict[str, Status] = {}
        thread = threading.Thread(target=lambda r=runner, res=result: res.update(status=r.run()), daemon=True)
        builds.append((name, reporter, driver, runner, thread, result))
    try:
        for build in builds:
            build[4].start()
        for name, reporter, driver, _, _, result in builds:
            # On a timeout, the VM's own log says how far it got (serial console, QEMU's errors).
            wait_for(lambda r=reporter, res=result: "ready djinn-test root" in r.text("run.1") or "status" in res, BOOT,
                     lambda n=name, r=reporter, d=driver: f"the {n} build's job: {dict(r.output)}{d._log_tail()}")
            assert "status" not in result, f"the {name} build ended early: {result} {dict(reporter.output)}"

        (_, _, a, *_), (_, _, b, *_) = builds
        assert a.port != b.port and a.pid != b.pid
        assert all(pid_alive(d.pid) and listening(d.port) for d in (a, b))
        assert sorted(qemu_processes(str(disks))) == sorted([a.pid, b.pid])

        killed_at = time.monotonic()
        for _, _, _, runner, _, _ in builds:
            runner.cancel(Status.KILLED)
        for name, reporter, driver, _, thread, result in builds:
            thread.join(60)
            assert not thread.is_alive(), f"the {name} build did not end after the kill"
            assert result["status"] is Status.KILLED
            assert reporter.statuses["run.1"] is Status.KILLED
            assert "never" not in reporter.text("run.1")
            assert not pid_alive(driver.pid)
        print(f"both builds ended {time.monotonic() - killed_at:.2f}s after the kill")
        assert qemu_processes(str(disks)) == []
        assert not listening(a.port) and not listening(b.port)
        assert sha256(qemu_image.path) == before
    finally:  # whatever failed above, leave no VM running
        for _, _, driver, runner, thread, _ in builds:
            runner.cancel(Status.KILLED)
            thread.join(60)
            driver.destroy()


def test_build_timeout_while_booting_kills_the_vm(qemu_image: QemuImage, tmp_path, reporter):
    disks = qemu_image.disks_with(tmp_path)
    driver = QEMUDriver(settings(disks))
    runner = make_runner(LONG_JOB, driver, reporter, tmp_path, timeout=3)
    started = time.monotonic()
    assert runner.run() is Status.TIMED_OUT
    assert time.monotonic() - started < 60  # create gave up promptly, not at its own 5-minute bound
    assert "Booting machine with image djinn-test" in reporter.text("create-driver")
    if expected_accel() == "tcg":  # no guest boots in 3s under emulation: the timeout hit the boot
        assert reporter.statuses["create-driver"] is Status.TIMED_OUT
        assert reporter.ran["run.1"] is False
    assert driver.pid is not None and not pid_alive(driver.pid)
    assert qemu_processes(str(disks)) == []
    assert driver.workdir is None


def test_port_taken_by_another_process_is_skipped_and_boot_bound_reported(qemu_image: QemuImage, tmp_path, monkeypatch):
    """A port grabbed by someone else between our pick and QEMU's bind: QEMU fails to forward it
    and the driver retries on another. Then the driver's own boot bound (3s, under TCG) ends the boot."""
    disks = qemu_image.disks_with(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    picks = iter([taken_port])
    real_free_port = qemu_module._free_port
    monkeypatch.setattr(qemu_module, "_free_port", lambda: next(picks, None) or real_free_port())
    driver = QEMUDriver(settings(disks, timeout="3s", accel="tcg"))
    try:
        with pytest.raises(DriverError, match=r"the machine did not let us in over SSH within 3s: could not connect to 127\.0\.0\.1:\d+"):
            driver.create({}, lambda data: None)
        assert driver.port not in (None, taken_port)
        assert not pid_alive(driver.pid)  # a failed boot kills its VM at once
    finally:
        driver.destroy()
        taken.close()
    assert not pid_alive(driver.pid)
    assert qemu_processes(str(disks)) == []


ORPHAN = """
import sys, threading, time
from djinn.drivers.qemu import QEMUDriver
driver = QEMUDriver({"image": "djinn-test", "disks": sys.argv[1], "memory": 256})
threading.Thread(target=driver.create, args=({}, lambda data: None), daemon=True).start()
while driver.pid is None:
    time.sleep(0.01)
print(driver.pid, driver.workdir, flush=True)
time.sleep(600)
"""


def test_vm_dies_with_a_worker_killed_by_sigkill(qemu_image: QemuImage, tmp_path):
    """No cancel, no destroy: the process that started the VM is SIGKILLed; the VM goes too."""
    disks = qemu_image.disks_with(tmp_path)
    worker = subprocess.Popen([sys.executable, "-c", ORPHAN, str(disks)], stdout=subprocess.PIPE, text=True)
    pid, workdir = worker.stdout.readline().split()
    try:
        wait_for(lambda: int(pid) in qemu_processes(str(disks)), 30, "the VM to start")
    finally:
        worker.kill()
        worker.wait()
    wait_for(lambda: qemu_processes(str(disks)) == [], 30, "the VM to die with its worker")
    shutil.rmtree(workdir)  # its log directory stays, as nothing ran destroy()


def test_missing_image(tmp_path):
    driver = QEMUDriver(settings(tmp_path, image="debian/missing"))
    expected = tmp_path / "_base" / "qemu" / "x86_64" / "debian" / "missing"
    with pytest.raises(DriverError, match=f"^qemu image debian/missing not found at {re.escape(str(expected))}$"):
        driver.create({}, lambda data: None)
    driver.destroy()


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a//b", ""])
def test_invalid_image_names(tmp_path, name):
    with pytest.raises(DriverError, match="image"):
        QEMUDriver(settings(tmp_path, image=name)).create({}, lambda data: None)


def test_locked_image_gives_a_specific_error(qemu_image: QemuImage, tmp_path):
    """Another QEMU holding the disk for writing (no snapshot mode): the build says so."""
    copy = tmp_path / "disks" / "_base" / "qemu" / "x86_64" / "locked"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(qemu_image.path, copy)
    holder = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
         "-drive", f"file={copy},if=virtio,format=qcow2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # The holder has the disk open (and locked) once its fd points at it.
        wait_for(lambda: any(Path(f"/proc/{holder.pid}/fd/{fd}").resolve() == copy
                             for fd in _fds(holder.pid)), 30, "the holder to open the disk")
        time.sleep(0.2)
        driver = QEMUDriver(settings(tmp_path / "disks", image="locked"))
        try:
            with pytest.raises(DriverError, match=r"qemu image locked at .* is locked by another process"):
                driver.create({}, lambda data: None)
        finally:
            driver.destroy()
        assert not pid_alive(driver.pid)
    finally:
        holder.kill()
        holder.wait()


def _fds(pid: int) -> list[str]:
    try:
        return [fd.name for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return []


def test_settings_are_checked():
    with pytest.raises(DriverError, match="cpus"):
        QEMUDriver({"image": "x", "cpus": "many"})
    with pytest.raises(DriverError, match="memory"):
        QEMUDriver({"image": "x", "memory": 0})
    with pytest.raises(DriverError, match="accel"):
        QEMUDriver.check({"accel": "xen"})
