"""qemu builds restored from a saved machine state (djinn.drivers.qemu_state), on real VMs.

The first build of an image boots it cold and saves the running machine; the
builds after it restore that state. Each test has its own disks directory, so
its saved states are its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from qemu_support import QemuImage, sha256

from djinn.drivers import qemu_state
from djinn.drivers.qemu import QEMUDriver
from djinn.runner.output import job_script

MEMORY = 512
RESTORED = b"Restored the machine from its saved state\n"
# Each value is printed in one write, named: the shell's trace (stderr) may come between
# writes to stdout, but not inside one, and where it shows a value it shows the same one.
PROBE = [
    'echo "clock=$(date +%s)"',
    "echo \"random=$(head -c 16 /dev/urandom | od -An -x | tr -d ' \\n')\"",
    "echo \"listing=$(ls /root | tr '\\n' ,)\"",
    "echo written-by-$BUILD > /root/mark-$BUILD",
]
PROBED = re.compile(r"\b(clock|random|listing)=([\w,.-]*)")


def run_build(disks: Path, name: str, **settings) -> tuple[bytes, dict[str, str], float]:
    """One build's create log, what its job probed (clock, random, listing) and the host's time when the job ran."""
    driver = QEMUDriver({"image": "djinn-test", "disks": str(disks), "memory": MEMORY, **settings})
    log = bytearray()
    out = bytearray()
    try:
        driver.create({"BUILD": name}, log.extend)
        ran_at = time.time()
        code = driver.execute("probe", job_script(PROBE), out.extend)
    finally:
        driver.destroy()
    assert code == 0, out.decode()
    probed = dict(PROBED.findall(out.decode()))
    assert set(probed) == {"clock", "random", "listing"}, out.decode()
    return bytes(log), probed, ran_at


def saved_states(disks: Path) -> list[qemu_state.SavedState]:
    root = disks / qemu_state.CACHE_DIR
    return [qemu_state.SavedState(d) for d in sorted(root.iterdir()) if qemu_state.PARTIAL not in d.name] if root.is_dir() else []


def checksums(saved: qemu_state.SavedState) -> tuple[str, str]:
    return sha256(saved.disk), sha256(saved.state)


@pytest.fixture(scope="module")
def first_build(qemu_image: QemuImage, tmp_path_factory) -> tuple[qemu_state.SavedState, dict[str, str]]:
    """The first build of the image: it boots cold and saves the machine. Its state, and its job's output."""
    disks = qemu_image.disks_with(tmp_path_factory.mktemp("first"))
    log, probed, _ = run_build(disks, "one")
    assert RESTORED not in log
    [saved] = saved_states(disks)
    return saved, probed


def with_saved_state(qemu_image: QemuImage, tmp_path: Path, saved: qemu_state.SavedState) -> Path:
    """A disks directory of the test's own holding a copy of `saved` (same image, so the same key)."""
    disks = qemu_image.disks_with(tmp_path)
    shutil.copytree(saved.directory, disks / qemu_state.CACHE_DIR / saved.directory.name)
    return disks


def test_restored_machines_are_isolated_current_and_random(qemu_image: QemuImage, first_build, tmp_path):
    saved_first, first = first_build
    disks = with_saved_state(qemu_image, tmp_path, saved_first)
    base = sha256(qemu_image.path)
    [saved] = saved_states(disks)
    frozen = checksums(saved)

    restored = []
    for name in ("two", "three"):
        log, probed, ran_at = run_build(disks, name)
        assert RESTORED in log, log.decode()
        clock, random, listing = probed["clock"], probed["random"], probed["listing"]
        # A file an earlier build wrote is not there: each build has a throwaway layer of its own.
        assert "mark-" not in listing, listing
        assert len(random) == 32, random
        # The guest's clock was set on restore (the saved machine's clock stopped when it was saved).
        assert abs(int(clock) - ran_at) <= 5, (clock, ran_at)
        restored.append(random)
    assert restored[0] != restored[1], "two restored machines produced the same random bytes"
    assert first["random"] not in restored

    # Nothing wrote to the base image or the saved state.
    assert sha256(qemu_image.path) == base
    assert saved_states(disks) == [saved] and checksums(saved) == frozen


def test_a_damaged_saved_state_is_removed_and_the_build_boots_cold(qemu_image: QemuImage, first_build, tmp_path):
    disks = with_saved_state(qemu_image, tmp_path, first_build[0])
    [saved] = saved_states(disks)
    recorded = json.loads(saved.meta.read_text())["state_sha256"]
    # Damage a few bytes in the middle: QEMU itself would load this and run a corrupted guest.
    with open(saved.state, "r+b") as f:
        f.seek(saved.state.stat().st_size // 2)
        f.write(b"\xff" * 16)

    log, probed, _ = run_build(disks, "two")
    text = log.decode()
    assert RESTORED not in log
    assert "the saved machine state of image djinn-test cannot be used (its state file does not match its checksum)" in text
    assert "the machine boots cold" in text
    assert "mark-" not in probed["listing"], "the cold boot saw another build's files"
    # The cold boot saved the machine again, whole this time.
    [again] = saved_states(disks)
    again.check()
    assert json.loads(again.meta.read_text())["state_sha256"] != recorded


def test_sweep_removes_unfinished_states_of_dead_workers_and_the_least_recently_used(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()

    def state(name: str, size: int, used: float) -> Path:
        directory = root / name
        directory.mkdir()
        (directory / "state").write_bytes(os.urandom(size))
        (directory / "meta.json").write_text("{}")
        os.utime(directory / "meta.json", (used, used))
        return directory

    old = state("old", 3 << 20, 1000.0)
    recent = state("recent", 3 << 20, 2000.0)
    dead = root / f"key{qemu_state.PARTIAL}999999999-1-1"  # no such process
    dead.mkdir()
    reused = root / f"key{qemu_state.PARTIAL}{os.getpid()}-1-1"  # this pid, but another process's start
    reused.mkdir()
    mine = qemu_state.staging_dir(root, "key")  # a live process is still saving it
    (mine / "state.partial").write_bytes(b"x")

    removed = qemu_state.sweep(root, limit=4 << 20)
    assert not dead.exists() and not reused.exists() and mine.exists()
    assert not old.exists() and recent.exists()  # over the bound: the least recently used goes first
    assert len(removed) == 3
    assert qemu_state.sweep(root, limit=4 << 20) == []
