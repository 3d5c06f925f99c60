"""Saved machine states: a qemu build starts from a machine that already booted.

The first build of an image boots it cold; once SSH answers, the running machine
is saved with QEMU's own migration to a file: the guest is paused, its disk is
frozen as `disk.qcow2` (the build goes on in a new overlay on top of it), its
memory and devices go to `state`, and it runs on. Later builds start QEMU with
the same devices on a throwaway overlay of `disk.qcow2` and load `state`; the
base image, the frozen disk and the state are never written again.

A state belongs to one machine: it is keyed by the image file's identity (path,
size, mtime, inode), the QEMU version and every device argument (memory, CPUs,
accelerator, ...), so anything that changes those boots cold and saves anew.
QEMU does not notice damaged memory pages in a state and waits forever on an
empty one, so a state is checked against its recorded size and sha256 before it
is loaded, and the load has a time limit; a state that fails either is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from djinn.drivers import leftovers
from djinn.errors import DriverError

log = logging.getLogger(__name__)

#: What a saved state holds and how it was made; bump it when that changes.
RECIPE = 1
#: Under the driver's disks directory.
CACHE_DIR = "_warm/qemu"
PARTIAL = ".partial-"
QMP_TIMEOUT = 30.0
#: How long loading a state may take before it is given up (TCG loads ~150 MiB in under a second).
LOAD_TIMEOUT = 60.0
HASH_CHUNK = 1 << 20


class MachineStateError(DriverError):
    """A saved state could not be made or restored; the build boots cold instead."""


class QMP:
    """The QEMU Machine Protocol on a unix socket, just enough for saving and loading states."""

    def __init__(self, path: Path, alive: Any, timeout: float = QMP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.settimeout(timeout)
                sock.connect(str(path))
                break
            except OSError as exc:
                sock.close()
                if not alive() or time.monotonic() > deadline:
                    raise MachineStateError(f"cannot reach QEMU's monitor: {exc}") from None
                time.sleep(0.005)
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise MachineStateError("QEMU closed its monitor")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def command(self, name: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
            while True:
                reply = self._read()
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise MachineStateError(f"QEMU refused {name}: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")
        except (OSError, ValueError) as exc:
            raise MachineStateError(f"QEMU's monitor failed during {name}: {exc}") from None

    def close(self) -> None:
        for closable in (self._file, self._sock):
            try:
                closable.close()
            except OSError:
                pass


_versions: dict[str, str] = {}


def qemu_version(qemu: str) -> str:
    """`qemu --version`'s first line, asked once per process."""
    if qemu not in _versions:
        try:
            out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MachineStateError(f"cannot ask {qemu} for its version: {exc}") from None
        _versions[qemu] = out.splitlines()[0] if out else ""
    return _versions[qemu]


def machine_key(qemu: str, devices: list[str], image: Path) -> str:
    """The identity of a saved state: what boots (the image file) and on what (QEMU and its devices)."""
    st = image.stat()
    identity = {
        "recipe": RECIPE,
        "qemu": qemu_version(qemu),
        "devices": devices,
        "image": [str(image.resolve()), st.st_size, st.st_mtime_ns, st.st_ino],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def overlay(path: Path, backing: Path, backing_format: str) -> None:
    """A new qcow2 at `path` whose reads fall through to `backing` (given by absolute path)."""
    try:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", backing_format, str(path)],
            capture_output=True, text=True, timeout=60, check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise MachineStateError(f"cannot make a disk overlay of {backing}: {str(detail).strip()}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class SavedState:
    """One saved machine: `disk.qcow2` (its frozen disk), `state` (memory and devices), `meta.json`."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def meta(self) -> Path:
        return self.directory / "meta.json"

    @classmethod
    def find(cls, root: Path, key: str) -> SavedState | None:
        saved = cls(root / key)
        return saved if saved.meta.is_file() else None

    def check(self) -> None:
        """Raise MachineStateError unless the files are whole: the size and sha256 recorded at saving."""
        try:
            meta = json.loads(self.meta.read_text())
            if self.state.stat().st_size != meta["state_size"] or not self.disk.is_file():
                raise MachineStateError("its files are incomplete")
            if _sha256(self.state) != meta["state_sha256"]:
                raise MachineStateError("its state file does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MachineStateError(f"it cannot be read: {exc}") from None
        os.utime(self.meta)  # used now: the size bound removes the least recently used first

    def session_pid(self) -> int | None:
        """The guest pid of the sshd whose connection was open at saving (gone in every restored machine)."""
        try:
            pid = json.loads(self.meta.read_text()).get("session_pid")
        except (OSError, ValueError):
            return None
        return pid if isinstance(pid, int) and pid > 1 else None

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def save(qmp: QMP, staging: Path, active: Path) -> Path:
    """Save the running machine into `staging` and let it run on with `active` as its disk's new top layer.

    The machine must run on `staging/disk.qcow2`; that file is frozen from here on.
    Returns the state file as written, which `seal` makes a saved state: the machine
    runs again before that, so the build need not wait for the disk.
    """
    qmp.command("stop")
    try:
        qmp.command("blockdev-snapshot-sync", device="disk0", **{"snapshot-file": str(active), "format": "qcow2", "mode": "absolute-paths"})
        partial = staging / "state.partial"
        qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})  # the default is 32 MiB/s
        qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(partial))}")
        deadline = time.monotonic() + LOAD_TIMEOUT
        while True:
            status = (qmp.command("query-migrate") or {}).get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise MachineStateError(f"saving the machine's state ended {status or 'without an answer'}")
            time.sleep(0.02)
    finally:
        qmp.command("cont")
    return partial


def seal(staging: Path, partial: Path, description: dict[str, Any]) -> None:
    """Make the state file `save` wrote durable and describe it (size, checksum): `staging` is then whole."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    partial.rename(staging / "state")
    meta = {**description, "state_size": (staging / "state").stat().st_size, "state_sha256": _sha256(staging / "state")}
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def publish(staging: Path, final: Path) -> bool:
    """Move a finished `staging` to `final`; False when another build saved the same machine first."""
    try:
        staging.rename(final)
        return True
    except OSError:
        return False


def restore(qmp: QMP, saved: SavedState, alive: Any) -> None:
    """Load `saved` into a QEMU started with `-incoming defer`, and run it."""
    qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(saved.state))}")
    deadline = time.monotonic() + LOAD_TIMEOUT
    while True:
        status = (qmp.command("query-status") or {}).get("status")
        if status != "inmigrate":
            break
        if not alive():
            raise MachineStateError("QEMU exited while loading the saved state")
        if time.monotonic() > deadline:
            raise MachineStateError(f"loading the saved state took longer than {LOAD_TIMEOUT:g}s")
        time.sleep(0.01)
    if status not in ("paused", "running", "postmigrate"):
        raise MachineStateError(f"the machine is {status} after loading its saved state")
    qmp.command("cont")


def staging_dir(root: Path, key: str) -> Path:
    """A new directory next to where `key`'s state goes, named by its process (pid and start) for the sweep."""
    root.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    directory = root / f"{key}{PARTIAL}{pid}-{leftovers.process_start(pid)}-{time.monotonic_ns()}"
    directory.mkdir()
    return directory


def _size(directory: Path) -> int:
    total = 0
    for entry in directory.iterdir():
        try:
            total += entry.stat().st_blocks * 512
        except OSError:
            pass
    return total


def sweep(root: Path, limit: int) -> list[str]:
    """Remove states that were never finished by a live process, then the least recently used beyond `limit` bytes."""
    if not root.is_dir():
        return []
    removed = []
    states = []
    for directory in root.iterdir():
        if not directory.is_dir():
            continue
        if PARTIAL in directory.name:
            pid, started = (directory.name.split(PARTIAL, 1)[1].split("-") + ["", ""])[:2]
            if not (pid.isdigit() and started.isdigit() and leftovers.same_process(int(pid), int(started))):
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(f"unfinished saved machine state {directory.name}")
            continue
        try:
            used = (directory / "meta.json").stat().st_mtime
        except OSError:
            used = 0.0
        states.append((used, directory))
    total = sum(_size(directory) for _, directory in states)
    for _, directory in sorted(states):
        if total <= limit:
            break
        total -= _size(directory)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"saved machine state {directory.name} (over the {limit >> 20} MiB bound)")
    return removed
