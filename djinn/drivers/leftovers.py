"""Owner markers on build directories, so a worker starting up can remove what a killed one left.

The os and qemu drivers make a temporary directory per build. Each gets a
marker file saying which build it is for and which process made it (pid and
the process's start time, so a recycled pid is not mistaken for the owner),
and, for qemu, which process is the VM. The process that made the directory is
the one running the build in it, so a directory is stale exactly when that
process is gone: no live worker runs a build from it (a rerun elsewhere, or on
this host, makes a directory of its own). The database cannot say more: a
worker restarted seconds after being killed still sees its build's heartbeat
as fresh. The sweep kills what still runs for a stale directory and removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from djinn.drivers.base import BuildIdentity

MARKER = "djinn-owner.json"


def _stat(pid: int) -> list[bytes] | None:
    """Fields 3 onwards of /proc/<pid>/stat (state first), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return stat[stat.rfind(b")") + 2:].split()


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, field 22 of /proc/<pid>/stat), or None when there is none."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def same_process(pid: Any, started: Any) -> bool:
    """Whether `pid` is still the running process that had start time `started` (not a recycled pid).

    A zombie counts as gone: a SIGKILLed worker's pool process stays one until an
    init that reaps lazily (a container's) gets to it, and it runs nothing.
    """
    if not (isinstance(pid, int) and pid > 0 and started is not None):
        return False
    fields = _stat(pid)
    if fields is None or not fields or fields[0] in (b"Z", b"X"):
        return False
    try:
        return bool(int(fields[19]) == started)
    except (IndexError, ValueError):
        return False


def identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "started": process_start(pid)}


def write_marker(directory: Path, build: BuildIdentity, **extra: Any) -> None:
    """Record in `directory` which build and which process (this one) it belongs to."""
    owner = {
        "build_id": build.build_id or None,
        "worker": build.worker or None,
        "host": socket.gethostname(),
        **identity(os.getpid()),
        **extra,
    }
    temporary = directory / f".{MARKER}.tmp"
    temporary.write_text(json.dumps(owner))
    temporary.replace(directory / MARKER)


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def stale_dirs(prefix: str, root: str | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Marked directories `<tmp>/<prefix>*` of this host whose owner process is gone.

    Directories without a marker (made by an older version, or not ours) are left alone.
    """
    base = Path(root or tempfile.gettempdir())
    host = socket.gethostname()
    try:
        candidates = sorted(p for p in base.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())
    except OSError:
        return
    for directory in candidates:
        owner = read_marker(directory)
        if owner is None or owner.get("host") != host:
            continue
        if same_process(owner.get("pid"), owner.get("started")):
            continue
        yield directory, owner


def kill_processes_in(directory: Path) -> list[int]:
    """SIGKILL every process whose working directory is `directory` or below it (a job left running)."""
    inside = str(directory.resolve())
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        cwd = cwd.removesuffix(" (deleted)")
        if cwd == inside or cwd.startswith(inside + "/"):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def sweep(prefix: str, what: str, root: str | None = None,
          before_remove: Callable[[Path, dict[str, Any]], list[str]] | None = None) -> list[str]:
    """Remove the stale directories `stale_dirs` finds (and the processes still running in them); says what went."""
    removed: list[str] = []
    for directory, owner in stale_dirs(prefix, root):
        if before_remove is not None:
            removed += before_remove(directory, owner)
        for pid in kill_processes_in(directory):
            removed.append(f"process {pid} of build {owner.get('build_id') or '?'}")
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"{what} {directory} of build {owner.get('build_id') or '?'}")
    return removed
