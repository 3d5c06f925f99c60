"""Owner markers on build directories, so a worker starting up can remove what a killed one left.

The os and qemu drivers make a temporary directory per build. Each says
which build it is for and which process made it (pid and the process's start
time, so a recycled pid is not mistaken for the owner): in its name (the os
driver's, made for every build: a marker file would be two more filesystem
writes on each build's critical path) or in a marker file (qemu's, which also
names the VM process once it runs). The process that made the directory is
the one running the build in it, so a directory is stale exactly when that
process is gone: no live worker runs a build from it (a rerun elsewhere, or on
this host, makes a directory of its own). The database cannot say more: a
worker restarted seconds after being killed still sees its build's heartbeat
as fresh. The sweep kills what still runs for a stale directory and removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
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


_own: dict[int, dict[str, Any]] = {}  # this process's identity, by pid (a forked child has a pid of its own)


def identity(pid: int) -> dict[str, Any]:
    if pid == os.getpid():
        if pid not in _own:
            _own[pid] = {"pid": pid, "started": process_start(pid)}
        return dict(_own[pid])
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
    # Written in place, not renamed into place: a sweep that reads it half written finds no
    # owner in it and leaves the directory alone, as it does one without a marker.
    (directory / MARKER).write_text(json.dumps(owner))


def _host_tag(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:8]


# <prefix><build>-<pid>-<start time>-<host tag>-<random>
_OWNED_NAME = re.compile(r"(\d+)-(\d+)-(\d+)-([0-9a-f]{8})-[0-9a-f]{8}")


def _of_host(owner: dict[str, Any], host: str) -> bool:
    return bool(owner.get("host") == host) if "host" in owner else owner.get("host_tag") == _host_tag(host)


def make_owned_dir(prefix: str, build: BuildIdentity, root: str | None = None) -> Path:
    """A new directory `<tmp>/<prefix>...` (mode 0700) whose name says which build and which process (this one) it is for."""
    me = identity(os.getpid())
    build_id = build.build_id if build.build_id.isdigit() else "0"
    owner = f"{prefix}{build_id}-{me['pid']}-{me['started'] or 0}-{_host_tag(socket.gethostname())}-"
    base = Path(root or tempfile.gettempdir())
    while True:
        path = base / (owner + secrets.token_hex(4))
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:  # one in four billion: draw again
            continue


def rename_owned_dir(directory: Path, prefix: str, build: BuildIdentity) -> Path | None:
    """`directory` (made by `make_owned_dir` in this process, under any prefix) renamed to `prefix` and `build`.

    The owner in the name stays; None, with nothing changed, when the directory
    is gone or its name is not one `make_owned_dir` gives.
    """
    found = _OWNED_NAME.search(directory.name)
    if found is None or found.end() != len(directory.name):
        return None
    build_id = build.build_id if build.build_id.isdigit() else "0"
    target = directory.with_name(f"{prefix}{build_id}{directory.name[found.end(1):]}")
    try:
        directory.rename(target)
    except OSError:
        return None
    return target


def name_owner(prefix: str, name: str) -> dict[str, Any] | None:
    """The owner `make_owned_dir` put in a directory's name, with a tag (a hash) for its host."""
    found = _OWNED_NAME.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
    if found is None:
        return None
    build_id, pid, started, host = found.groups()
    return {"build_id": None if build_id == "0" else build_id, "pid": int(pid), "started": int(started), "host_tag": host}


def owner_of(prefix: str, directory: Path) -> dict[str, Any] | None:
    """Who made `directory`: from its name, else from its marker file."""
    return name_owner(prefix, directory.name) or read_marker(directory)


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def stale_dirs(prefix: str, root: str | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Marked directories `<tmp>/<prefix>*` of this host whose owner process is gone.

    Directories that name no owner (not ours) are left alone.
    """
    base = Path(root or tempfile.gettempdir())
    host = socket.gethostname()
    try:
        candidates = sorted(p for p in base.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())
    except OSError:
        return
    for directory in candidates:
        owner = owner_of(prefix, directory)
        if owner is None or not _of_host(owner, host):
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
