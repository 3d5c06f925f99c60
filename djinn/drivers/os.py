"""The os driver: job scripts run with /bin/sh on the worker host, in a directory made for the build.

For trusted builds and local use. The build environment goes to the child
processes only, never into the worker's own environment.

No process outlives its build: every job process carries a per-build tag in
its environment (DJINN_BUILD_TAG), which its children inherit also when they
leave the job's process group (`setsid`, a double-forked daemon). At the end of
each job, and on kill or timeout, every process of ours whose environment holds
the tag is killed. Only a process that replaces its whole environment (`env -i`)
escapes this; a cgroup per build would not, but needs a writable cgroup tree.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

from djinn.config.settings import OSSettings
from djinn.drivers import leftovers
from djinn.drivers.base import BuildIdentity, Driver, Output, inline_script
from djinn.drivers.scratch import SCRATCH
from djinn.errors import DriverError
from djinn.paths import resolve_inside

#: Build directories are <tmp>/djinn-build-*, their owner in their name (djinn.drivers.leftovers);
#: one made ahead for the next build is <tmp>/djinn-spare-* (djinn.drivers.scratch).
DIR_PREFIX = "djinn-build-"
SPARE_PREFIX = "djinn-spare-"
READ_SIZE = 1 << 20
# After a job's shell exits, how long its leftover children may keep the output pipe open.
DRAIN_SECONDS = 2.0
# Variables of the worker's own environment a build inherits; nothing else (database
# passwords and the like) leaks into build processes.
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ")
#: The environment variable that marks every process of one build.
TAG_VARIABLE = "DJINN_BUILD_TAG"
# How many rounds of scan-and-kill before giving up on a process that keeps forking.
KILL_ROUNDS = 50
# Up to how many candidate pids are tried one by one rather than found by listing /proc.
DIRECT_LOOKUPS = 128


class OSDriver(Driver):
    type = "os"
    Settings = OSSettings

    def __init__(self, values: Mapping[str, Any] | None = None, identity: BuildIdentity | None = None, *, configured: Any = None) -> None:
        super().__init__(values, identity, configured=configured)
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cancelled = False
        self._process: subprocess.Popen[bytes] | None = None
        self.tag = secrets.token_hex(12)
        self._born: _PidClock | None = None  # where pid allocation stood before the first job
        self._swept = True  # no job ran since the last sweep for tagged processes found none

    @property
    def workspace(self) -> Path:
        if self.root is None:
            raise DriverError("the os driver was used before it was created")
        return self.root / "workspace"

    def create(self, env: Mapping[str, str], log: Output) -> None:
        self._born = _PidClock.now()
        # The build's own directory, its owner in its name (no marker file to write), and in it
        # the workspace: what a job puts in `..` stays private to the build and goes with it.
        # Made ahead, while the build before ran, when this process ran one (djinn.drivers.scratch).
        tmp = tempfile.gettempdir()
        spare = SCRATCH.take(_spares(tmp), lambda: _build_dir(SPARE_PREFIX, BuildIdentity(), tmp))
        self.root = leftovers.rename_owned_dir(spare, DIR_PREFIX, self.identity) if spare is not None else None
        if self.root is None:
            self.root = _build_dir(DIR_PREFIX, self.identity, tmp)
        base = {k: os.environ[k] for k in INHERITED if k in os.environ}
        base.setdefault("PATH", os.defpath)
        self.env = {**base, "HOME": str(self.workspace), **env, TAG_VARIABLE: self.tag}
        log(f"Running with OS driver in {self.workspace}...\n".encode())

    def key_location(self, name: str) -> str:
        # Never the worker's own ~/.ssh: keys stay inside the build directory.
        return f".ssh/{name}"

    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        target = resolve_inside(self.workspace, dest, "object destination")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            shutil.copyfileobj(data, out, READ_SIZE)
        os.chmod(target, mode)

    def execute(self, name: str, script: bytes, output: Output) -> int:
        if self.root is None:
            raise DriverError("the os driver was used before it was created")
        text = inline_script(script)
        script_path = None
        if text is not None:
            argv = ["/bin/sh", "-c", text, f"{name}.sh"]
        else:
            script_path = self.root / f"{name}.sh"  # beside the workspace, not in it
            script_path.write_bytes(script)
            script_path.chmod(0o755)
            argv = ["/bin/sh", str(script_path)]
        with self._lock:
            if self._cancelled:
                return -signal.SIGKILL
            self._swept = False
            process = subprocess.Popen(
                argv,
                cwd=self.workspace,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._process = process
        try:
            self._stream(process, output)
            return process.wait()
        finally:
            self._kill_group(process)
            self.kill_tagged()
            with self._lock:
                self._process = None
                self._swept = True
            if script_path is not None:
                script_path.unlink(missing_ok=True)

    def _stream(self, process: subprocess.Popen[bytes], output: Output) -> None:
        """Copy the job's output until the pipe closes, or shortly after the shell exits."""
        assert process.stdout is not None  # Popen with stdout=PIPE
        fd = process.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        exited_at: float | None = None
        try:
            while True:
                if poller.poll(200):
                    data = os.read(fd, READ_SIZE)
                    if not data:
                        return
                    output(data)
                    continue
                if exited_at is None and process.poll() is not None:
                    # Background children may hold the pipe forever: they die with the job.
                    self._kill_group(process)
                    exited_at = time.monotonic()
                elif exited_at is not None and time.monotonic() - exited_at > DRAIN_SECONDS:
                    return
        finally:
            process.stdout.close()

    def tagged_processes(self) -> list[int]:
        """Pids of live processes whose environment carries this build's tag (those we may read).

        Only processes made since `create` can carry it, so only their environments are
        read: usually a handful of pids, looked up one by one without listing /proc.
        """
        marker = f"{TAG_VARIABLE}={self.tag}".encode()
        made = self._born.made_since() if self._born is not None else None
        if made is not None and sum(map(len, made)) <= DIRECT_LOOKUPS:
            candidates: Iterable[int] = itertools.chain.from_iterable(made)
        else:
            listed = (int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit())
            candidates = listed if made is None else (pid for pid in listed if any(pid in r for r in made))
        found = []
        for pid in candidates:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read()
            except OSError:  # gone, another user's, or never made
                continue
            if marker in environ.split(b"\0"):
                found.append(pid)
        return found

    def kill_tagged(self) -> None:
        """SIGKILL every process of this build, also those that left the job's process group."""
        for _ in range(KILL_ROUNDS):
            pids = [pid for pid in self.tagged_processes() if pid != os.getpid()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)  # let the kills land before looking for forks made meanwhile

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        pattern = str(resolve_inside(self.workspace, source, "artifact source")) if "*" not in source else None
        if pattern is None:
            resolve_inside(self.workspace, os.path.dirname(source) or ".", "artifact source")
            matches = sorted(glob.glob(str(self.workspace / source)))
        else:
            matches = [pattern] if os.path.exists(pattern) else []
        for match in matches:
            path = resolve_inside(self.workspace, os.path.relpath(match, self.workspace), "artifact source")
            if path.is_file():
                with open(path, "rb") as stream:
                    yield os.path.relpath(path, os.path.realpath(self.workspace)), stream

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            process = self._process
            swept = self._swept
        if process is not None:
            self._kill_group(process)
        if not swept:  # a job ran (or runs) since the last sweep found nothing
            self.kill_tagged()

    def destroy(self) -> None:
        self.cancel()  # nothing of the build runs any more: its directory can be emptied in the background
        if self.root is not None:
            SCRATCH.recycle(_spares(os.fspath(self.root.parent)), self.root, _emptied)
            self.root = None


def _spares(tmp: str) -> tuple[str, str]:
    """The scratch key of the spare build directories in `tmp`: where a build's directory comes from and goes back to."""
    return (SPARE_PREFIX, os.path.normpath(tmp))  # as the build directory's parent names it


def _build_dir(prefix: str, build: BuildIdentity, tmp: str) -> Path:
    root = leftovers.make_owned_dir(prefix, build, tmp)
    (root / "workspace").mkdir(mode=0o700)
    return root


def _emptied(root: Path) -> Path | None:
    """`root` emptied to what `_build_dir` makes and named a spare; None when it is not plainly that (it is then removed).

    Every process of the build is gone (destroy kills them first). What the build
    left goes: the workspace's contents and anything beside it, keys included.
    """
    workspace = root / "workspace"
    me = os.geteuid()
    for directory, keep in ((root, "workspace"), (workspace, None)):
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != me:  # a job put something else in its place
            return None
        os.chmod(directory, 0o700)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name == keep:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
    if os.listdir(workspace) or os.listdir(root) != ["workspace"]:  # written to meanwhile
        return None
    return leftovers.rename_owned_dir(root, SPARE_PREFIX, BuildIdentity())


def _read_int(path: str, prefix: bytes = b"") -> int | None:
    """The number on the first line of `path` that starts with `prefix` (read on every job: no line-by-line Python)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = [b"\n"]
            while chunk := os.read(fd, 1 << 16):  # /proc/stat of a many-CPU host may be longer
                chunks.append(chunk)
        finally:
            os.close(fd)
        text = b"".join(chunks)
        start = text.find(b"\n" + prefix)
        if start >= 0:
            start += 1 + len(prefix)
            end = text.find(b"\n", start)
            return int(text[start:end if end >= 0 else None])
    except (OSError, ValueError):
        pass
    return None


@functools.cache
def _pid_max() -> int | None:
    """Read once per process: it is set at boot, and hardly ever changed on a running host."""
    return _read_int("/proc/sys/kernel/pid_max")


@dataclass(frozen=True)
class _PidClock:
    """Where the kernel's pid allocation stands: the last pid handed out, and how many were.

    Pids are handed out in turn, wrapping at pid_max, so every process made after a
    reading has a pid in the cyclic interval after its last pid, as long as fewer than
    pid_max were made since. Without these files (not Linux) nothing is ruled out.
    """

    last: int | None
    made: int | None
    limit: int | None

    @classmethod
    def now(cls) -> _PidClock:
        return cls(_read_int("/proc/sys/kernel/ns_last_pid"), _read_int("/proc/stat", b"processes "), _pid_max())

    def made_since(self, now: _PidClock | None = None) -> list[range] | None:
        """The pids a process made between this reading and `now` may have (one range, two once wrapped); None when any may."""
        now = now or _PidClock.now()
        first, last = self.last, now.last
        if first is None or last is None or self.made is None or now.made is None or self.limit is None:
            return None
        if now.made - self.made >= self.limit // 2:  # could have come round to `first` again
            return None
        if last >= first:
            return [range(first + 1, last + 1)]
        return [range(first + 1, self.limit), range(1, last + 1)]  # wrapped once


def sweep(root: str | None = None) -> list[str]:
    """Remove build directories (and processes still running in them) whose worker process is gone.

    A worker calls it at start-up; a directory whose owner process is alive is
    never touched (djinn.drivers.leftovers).
    """
    return leftovers.sweep(DIR_PREFIX, "build directory", root) + leftovers.sweep(SPARE_PREFIX, "spare build directory", root)


DRIVER = OSDriver
