"""Build directories removed behind the build: gone once drained, in the process that made them."""

from __future__ import annotations

from pathlib import Path

from waiting import in_forked_child

from djinn.drivers.base import BuildIdentity
from djinn.drivers.os import OSDriver
from djinn.drivers.removal import REMOVER, Remover


def test_a_destroyed_os_build_directory_is_gone_once_the_remover_drained(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    driver = OSDriver({}, BuildIdentity("7", "test"))
    driver.create({}, lambda data: None)
    root = driver.root
    assert driver.execute("a.1", b"mkdir -p deep/er && echo x > deep/er/file\n", lambda data: None) == 0
    driver.destroy()
    assert driver.root is None
    assert REMOVER.drain(30)
    assert not root.exists() and list(tmp_path.iterdir()) == []


def test_a_forked_child_removes_its_own_paths_with_a_thread_of_its_own(tmp_path):
    remover = Remover()
    mine = tmp_path / "parent"
    mine.mkdir()
    remover.remove(mine)
    assert remover.drain(30) and not mine.exists()

    def child(theirs: Path) -> bool:  # the parent's thread is not here; its own removal must still happen
        theirs.mkdir()
        remover.remove(theirs)
        return remover.drain(30) and not theirs.exists()

    assert in_forked_child(lambda: child(tmp_path / "child")) == "passed"
    # Forked while the parent's removal thread held the lock: the child's own lock is free.
    assert in_forked_child(lambda: child(tmp_path / "child2"), while_held=remover._cond) == "passed"
