"""The start-up sweep (issue 12 item 4): what a killed worker left of os and qemu builds goes, nothing else.

Real processes and directories: a worker tree SIGKILLed mid-build, then a new
worker; and the sweep itself against marked directories whose owners are alive,
dead, or recycled pids.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from ops_support import alive, wait_job_running
from waiting import wait_for

from djinn.drivers import BuildIdentity, leftovers, qemu
from djinn.drivers import os as os_driver
from djinn.drivers.scratch import SCRATCH

LONG = "driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo started', 'sleep 120']}\n"





def processes_in(directory: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd").removesuffix(" (deleted)")
            except OSError:
                continue
            if cwd.startswith(str(directory)):
                found.append(int(entry))
    return found


def dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has exited."""
    proc = subprocess.Popen(["sleep", "0"])
    started = leftovers.process_start(proc.pid)
    proc.wait()
    return proc.pid, started if started is not None else 1


def mark(directory: Path, *, build_id: str | None, pid: int, started: int | None, host: str | None = None, **extra) -> Path:
    directory.mkdir()
    (directory / "workspace").mkdir()
    owner = {"build_id": build_id, "worker": f"test:{pid}", "host": host or socket.gethostname(), "pid": pid,
             "started": started, **extra}
    (directory / leftovers.MARKER).write_text(json.dumps(owner))
    return directory


def test_killed_worker_leaves_an_os_build_directory_the_next_worker_removes(worker_env, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the workers' temporary directory: only this test's builds
    first = worker_env.start_worker(name="first")
    build_id = worker_env.submit(LONG)
    wait_job_running(worker_env, build_id, timeout=60)
    (build_dir,) = scratch.glob("djinn-build-*")
    owner = leftovers.owner_of(os_driver.DIR_PREFIX, build_dir)
    assert owner["build_id"] == str(build_id) and leftovers._of_host(owner, socket.gethostname())
    jobs = processes_in(build_dir)
    assert jobs, "no job process runs in the build directory"

    worker_env.kill_group(first)
    assert build_dir.exists()  # what the SIGKILL left (and perhaps the job, which runs in a session of its own)

    second = worker_env.start_worker(name="second")
    wait_for(lambda: not build_dir.exists(), 60, lambda: f"{build_dir} is still there; log:\n{worker_env.log_tail()}")
    wait_for(lambda: not any(alive(pid) for pid in jobs), 30, "the stale job still runs")
    assert f"removed leftover build directory {build_dir} of build {build_id}" in (worker_env.root / "worker.log").read_text()

    # The rerun (the build was orphaned) gets a new directory, which the sweep of a third worker leaves alone.
    # The dead run's rows say running until the reaper resets them: wait for the second attempt's own directory.
    wait_for(lambda: worker_env.sql("SELECT attempt FROM builds WHERE id = :b", b=build_id) == [(2,)]
               and len(list(scratch.glob("djinn-build-*"))) == 1, 90, "the build was not rerun")
    (rerun_dir,) = scratch.glob("djinn-build-*")
    worker_env.start_worker(name="third")
    assert rerun_dir.exists() and worker_env.status(build_id)["status"] == "running"
    worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id, timeout=30)["status"] == "killed"
    wait_for(lambda: not rerun_dir.exists(), 30, "the killed build's directory was not removed")
    assert second.poll() is None


def test_sweep_removes_only_directories_whose_owner_is_gone(tmp_path):
    pid, started = dead_process()
    me = os.getpid()
    stale = mark(tmp_path / "djinn-build-stale", build_id="11", pid=pid, started=started)
    job = subprocess.Popen(["sleep", "300"], cwd=stale / "workspace", start_new_session=True)
    live_owner = mark(tmp_path / "djinn-build-live", build_id="12", pid=me, started=leftovers.process_start(me))
    recycled = mark(tmp_path / "djinn-build-recycled", build_id="13", pid=me, started=leftovers.process_start(me) - 1)
    # Its build may well run on another worker now (a rerun): this directory is still of no use.
    dead_owner = mark(tmp_path / "djinn-build-rerun", build_id="14", pid=pid, started=started)
    other_host = mark(tmp_path / "djinn-build-other", build_id="15", pid=pid, started=started, host="another-host")
    unmarked = tmp_path / "djinn-build-unmarked"
    unmarked.mkdir()
    not_ours = mark(tmp_path / "something-else", build_id="16", pid=pid, started=started)
    try:
        removed = os_driver.sweep(root=str(tmp_path))
        assert not stale.exists() and not recycled.exists() and not dead_owner.exists()
        assert live_owner.exists() and other_host.exists() and unmarked.exists()
        assert not_ours.exists()
        assert job.wait(10) == -9  # the job left running in the stale directory was killed
        assert f"process {job.pid} of build 11" in removed
        assert {item for item in removed if item.startswith("build directory")} == {
            f"build directory {stale} of build 11", f"build directory {recycled} of build 13",
            f"build directory {dead_owner} of build 14"}
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_sweep_reads_the_owner_from_a_build_directory_name(tmp_path):
    """The os driver names its owner in the directory's name (no marker file): the sweep goes by that."""
    pid, started = dead_process()
    me = os.getpid()
    live = leftovers.make_owned_dir(os_driver.DIR_PREFIX, BuildIdentity("31", "test:1"), root=str(tmp_path))
    assert leftovers.owner_of(os_driver.DIR_PREFIX, live) == {
        "build_id": "31", "pid": me, "started": leftovers.process_start(me), "host_tag": leftovers._host_tag(socket.gethostname())}
    assert not (live / leftovers.MARKER).exists() and oct(live.stat().st_mode & 0o777) == "0o700"

    def named(build: str, owner_pid: int, owner_started: int, host: str = socket.gethostname()) -> Path:
        path = tmp_path / f"{os_driver.DIR_PREFIX}{build}-{owner_pid}-{owner_started}-{leftovers._host_tag(host)}-0123abcd"
        (path / "workspace").mkdir(parents=True)
        return path

    stale = named("32", pid, started)
    job = subprocess.Popen(["sleep", "300"], cwd=stale / "workspace", start_new_session=True)
    recycled = named("33", me, leftovers.process_start(me) - 1)
    other_host = named("34", pid, started, host="another-host")
    garbled = tmp_path / f"{os_driver.DIR_PREFIX}35-{pid}-x-{leftovers._host_tag(socket.gethostname())}-0123abcd"
    garbled.mkdir()
    try:
        removed = os_driver.sweep(root=str(tmp_path))
        assert not stale.exists() and not recycled.exists()
        assert live.exists() and other_host.exists() and garbled.exists()
        assert job.wait(10) == -9
        assert f"process {job.pid} of build 32" in removed
        assert f"build directory {recycled} of build 33" in removed
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_qemu_sweep_kills_a_stray_vm_process_and_removes_its_directory(tmp_path):
    """A stand-in VM process (qemu would need an image and minutes): the sweep goes by the recorded pid and start time."""
    pid, started = dead_process()
    vm = subprocess.Popen(["sleep", "300"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        stale = mark(tmp_path / "djinn-qemu-stale", build_id="21", pid=pid, started=started,
                     vm_pid=vm.pid, vm_started=leftovers.process_start(vm.pid))
        (stale / "qemu.log").write_text("booting\n")
        # Its pid was recycled (start time differs): that process is someone else's and stays.
        recycled = mark(tmp_path / "djinn-qemu-recycled", build_id="22", pid=pid, started=started,
                        vm_pid=bystander.pid, vm_started=leftovers.process_start(bystander.pid) - 1)
        me = os.getpid()
        kept = mark(tmp_path / "djinn-qemu-running", build_id="23", pid=me, started=leftovers.process_start(me),
                    vm_pid=bystander.pid, vm_started=leftovers.process_start(bystander.pid))
        removed = qemu.sweep(root=str(tmp_path))
        assert vm.wait(10) == -9
        assert bystander.poll() is None
        assert not stale.exists() and not recycled.exists() and kept.exists()
        assert f"{qemu.QEMU} process {vm.pid} of build 21" in removed
    finally:
        for proc in (vm, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_owner_that_is_a_zombie_is_gone(tmp_path):
    """A SIGKILLed worker's pool process can stay a zombie for seconds (an init that reaps lazily): it runs nothing."""
    child = subprocess.Popen(["true"])  # not waited for yet: a zombie of this process
    started = leftovers.process_start(child.pid)
    try:
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z",
                 10, "the child to exit")
        assert leftovers.process_start(child.pid) == started  # the pid and its start time still read as before
        assert not leftovers.same_process(child.pid, started)
        zombie_owned = mark(tmp_path / "djinn-build-zombie", build_id="17", pid=child.pid, started=started)
        assert os_driver.sweep(root=str(tmp_path)) == [f"build directory {zombie_owned} of build 17"]
        assert not zombie_owned.exists()
    finally:
        child.wait()


def test_os_driver_marks_its_build_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    driver = os_driver.OSDriver({}, BuildIdentity("31", "host:1"))
    driver.create({}, lambda data: None)
    try:
        owner = leftovers.owner_of(os_driver.DIR_PREFIX, driver.root)
        assert owner["build_id"] == "31" and leftovers.same_process(owner["pid"], owner["started"])
        assert os_driver.sweep(root=str(tmp_path)) == []  # its owner (this process) is alive
    finally:
        driver.destroy()
    assert SCRATCH.drain(30)  # removed behind the build (djinn.drivers.scratch)
    assert list(tmp_path.iterdir()) == []


def test_killed_qemu_worker_leaves_a_vm_directory_the_next_worker_removes(worker_env, qemu_image, tmp_path, monkeypatch):
    """A real VM booting for a build when its worker tree is SIGKILLed; the next worker cleans up."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    disks = qemu_image.disks_with(worker_env.root)
    worker_env.write_config(driver="qemu", driver_config=f'driver qemu {{\n    disks "{disks}"\n    cpus 1\n    memory 512\n}}\n')
    first = worker_env.start_worker(name="first")
    build_id = worker_env.submit("driver: {type: qemu, image: djinn-test}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 600']}\n")

    def vm_started():
        for directory in scratch.glob("djinn-qemu-*"):
            owner = leftovers.read_marker(directory)
            if owner and owner.get("vm_pid"):
                return directory, owner
        return None

    wait_for(vm_started, 120, lambda: f"no VM started; log:\n{worker_env.log_tail()}")
    vm_dir, owner = vm_started()
    assert owner["build_id"] == str(build_id) and alive(owner["vm_pid"])
    worker_env.kill_group(first)
    assert vm_dir.exists()  # QEMU's log and overlay directory: nothing ran destroy()

    worker_env.start_worker(name="second")
    wait_for(lambda: not vm_dir.exists(), 60, lambda: f"{vm_dir} is still there; log:\n{worker_env.log_tail()}")
    wait_for(lambda: not alive(owner["vm_pid"]), 30, "the VM of the killed worker still runs")
    assert f"removed leftover VM directory {vm_dir} of build {build_id}" in (worker_env.root / "worker.log").read_text()
    # The rerun: the reaper takes the dead run over, then a pool process claims it. A kill sent
    # before that process listens is missed, as upstream's would be: send it until it lands.
    wait_for(lambda: worker_env.sql("SELECT attempt FROM builds WHERE id = :b", b=build_id) == [(2,)], 90,
               lambda: f"the build was not rerun; log:\n{worker_env.log_tail()}")
    deadline = time.monotonic() + 120
    while worker_env.sql("SELECT status FROM builds WHERE id = :b", b=build_id) != [("killed",)]:
        assert time.monotonic() < deadline, f"the rerun was never killed; log:\n{worker_env.log_tail()}"
        worker_env.cli("kill", str(build_id))
        time.sleep(2)
