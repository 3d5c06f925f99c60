"""Build directories made ahead and removed behind the build: each the process's own, none left once drained."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from waiting import in_forked_child, wait_for

from djinn.drivers import leftovers
from djinn.drivers import os as os_driver
from djinn.drivers.base import BuildIdentity
from djinn.drivers.os import OSDriver
from djinn.drivers.scratch import MAX_SPARES, SCRATCH, Scratch


def spares(root: Path) -> list[Path]:
    return sorted(root.glob(f"{os_driver.SPARE_PREFIX}*"))


def test_a_destroyed_os_build_directory_is_gone_once_drained(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    driver = OSDriver({}, BuildIdentity("7", "test"))
    driver.create({}, lambda data: None)
    root = driver.root
    assert driver.execute("a.1", b"mkdir -p deep/er && echo x > deep/er/file\n", lambda data: None) == 0
    driver.destroy()
    assert driver.root is None
    assert SCRATCH.drain(30)
    assert not root.exists() and list(tmp_path.iterdir()) == []  # the spare made meanwhile is gone too


def test_the_next_build_gets_a_directory_made_ahead_renamed_to_name_it(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    first = OSDriver({}, BuildIdentity("7", "test"))
    first.create({}, lambda data: None)
    try:
        # Ready once handed to the scratch, not once on disk: a build before that makes its own.
        wait_for(lambda: SCRATCH.spares((os_driver.SPARE_PREFIX, str(tmp_path))) == 1, 10, "a directory made ahead")
        [spare] = spares(tmp_path)
        made_ahead = spare.stat().st_ino
        assert leftovers.owner_of(os_driver.SPARE_PREFIX, spare)["build_id"] is None  # no build yet, this process's
        assert sorted(p.name for p in spare.iterdir()) == ["workspace"]

        second = OSDriver({}, BuildIdentity("8", "test"))
        second.create({}, lambda data: None)
        try:
            assert second.root.stat().st_ino == made_ahead and not spare.exists()  # renamed, not made
            owner = leftovers.owner_of(os_driver.DIR_PREFIX, second.root)
            assert owner["build_id"] == "8" and leftovers.same_process(owner["pid"], owner["started"])
            assert second.execute("a.1", b"pwd\n", lambda data: None) == 0
            wait_for(lambda: len(spares(tmp_path)) == 1, 10, "the one after it made ahead too")
            # A live owner's spare is not a leftover: another worker's start-up sweep leaves it.
            assert os_driver.sweep(root=str(tmp_path)) == [] and len(spares(tmp_path)) == 1
        finally:
            second.destroy()
    finally:
        first.destroy()
    assert SCRATCH.drain(30) and list(tmp_path.iterdir()) == []


LITTERS = b"""
mkdir -p deep/er .ssh locked && echo x > deep/er/file && echo key > .ssh/id && echo beside > ../beside
ln -s /etc link && chmod 000 locked && chmod 755 . && touch ../also
"""


def test_a_finished_build_directory_is_emptied_and_becomes_the_next_builds(tmp_path, monkeypatch):
    """Behind the build its directory is emptied and renamed a spare: no directory is made or removed per build."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    key = (os_driver.SPARE_PREFIX, str(tmp_path))
    first = OSDriver({}, BuildIdentity("7", "test"))
    first.create({}, lambda data: None)
    used = first.root
    inodes = (used.stat().st_ino, first.workspace.stat().st_ino)
    assert first.execute("a.1", LITTERS, lambda data: None) == 0
    first.destroy()
    wait_for(lambda: SCRATCH.spares(key) == 2, 10, "the finished directory back as a spare, beside the one made ahead")
    assert not used.exists()

    second = OSDriver({}, BuildIdentity("8", "test"))
    second.create({}, lambda data: None)
    try:
        assert (second.root.stat().st_ino, second.workspace.stat().st_ino) == inodes  # the same directories
        assert leftovers.owner_of(os_driver.DIR_PREFIX, second.root)["build_id"] == "8"
        assert [p.name for p in second.root.iterdir()] == ["workspace"] and list(second.workspace.iterdir()) == []
        assert stat.S_IMODE(second.root.stat().st_mode) == stat.S_IMODE(second.workspace.stat().st_mode) == 0o700
    finally:
        second.destroy()
    assert SCRATCH.drain(30) and list(tmp_path.iterdir()) == []


def test_a_workspace_a_job_replaced_is_removed_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    key = (os_driver.SPARE_PREFIX, str(tmp_path / "tmp"))
    driver = OSDriver({}, BuildIdentity("7", "test"))
    driver.create({}, lambda data: None)
    root = driver.root
    wait_for(lambda: SCRATCH.spares(key) == 1, 10, "a directory made ahead")
    script = f"cd .. && rm -rf workspace && ln -s {outside} workspace\n".encode()
    assert driver.execute("a.1", script, lambda data: None) == 0
    driver.destroy()
    assert SCRATCH.drain(30)
    assert not root.exists() and list((tmp_path / "tmp").iterdir()) == []
    assert (outside / "keep").read_text() == "mine"  # the link was removed, not followed


def test_spares_beyond_the_bound_are_removed(tmp_path):
    scratch = Scratch()
    dirs = [tmp_path / f"d{n}" for n in range(4)]
    for d in dirs:
        d.mkdir()
    scratch.recycle("k", dirs[0], lambda path: None)  # could not be emptied: removed
    for d in dirs[1:]:
        scratch.recycle("k", d, lambda path: path)
    wait_for(lambda: not dirs[0].exists() and scratch.spares("k") == MAX_SPARES, 10, "two spares")
    assert scratch.drain(30) and list(tmp_path.iterdir()) == []


def test_a_killed_processs_spare_is_swept(tmp_path):
    """A worker killed between two builds leaves its spare: the next worker's sweep removes it."""
    script = (
        "import tempfile, sys\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "from djinn.drivers.os import OSDriver\n"
        "from djinn.drivers.base import BuildIdentity\n"
        "d = OSDriver({}, BuildIdentity('9', 'test'))\n"
        "d.create({}, lambda data: None)\n"
        "print('created', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"created\n"
        wait_for(lambda: len(spares(tmp_path)) == 1, 10, "the child's spare")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    [spare] = spares(tmp_path)
    removed = os_driver.sweep(root=str(tmp_path))
    assert f"spare build directory {spare} of build ?" in removed
    assert list(tmp_path.iterdir()) == []


def test_a_forked_child_has_work_and_spares_of_its_own(tmp_path):
    scratch = Scratch()
    mine = tmp_path / "parent"
    mine.mkdir()
    scratch.recycle("k", mine, lambda path: None)  # nothing handed back: removed
    assert scratch.drain(30) and not mine.exists()

    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        return path

    assert scratch.take("k", lambda: make("parent-spare")) is None
    wait_for(lambda: (tmp_path / "parent-spare").exists() and scratch._spares, 10, "the parent's spare")

    def child(theirs: Path) -> bool:  # the parent's thread and spare are not here: its own work must still happen
        theirs.mkdir()
        scratch.recycle("k", theirs, lambda path: None)
        if scratch.take("k", lambda: make(f"{theirs.name}-spare")) is not None:
            return False  # the parent's spare is the parent's
        return scratch.drain(30) and not theirs.exists() and not (tmp_path / f"{theirs.name}-spare").exists()

    assert in_forked_child(lambda: child(tmp_path / "child")) == "passed"
    # Forked while the parent's thread held the lock: the child's own lock is free.
    assert in_forked_child(lambda: child(tmp_path / "child2"), while_held=scratch._cond) == "passed"
    assert scratch.take("k", lambda: make("next")) == tmp_path / "parent-spare"
    assert scratch.drain(30) and list(tmp_path.iterdir()) == [tmp_path / "parent-spare"]  # taken: the taker's


def test_a_spare_that_cannot_be_made_leaves_the_build_to_make_its_own(tmp_path):
    scratch = Scratch()

    def fail() -> Path:
        raise PermissionError("no room")

    assert scratch.take("k", fail) is None
    assert scratch.drain(30)  # nothing waits for a spare that will not come
    assert scratch.take("k", fail) is None
