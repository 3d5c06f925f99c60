"""Fixtures for the qemu driver's tests: the bootable test image and process checks.

The image is built by the project's own script (scripts/qemu-test-image, which
installs QEMU and the build tools through scripts/qemu-deps), so the tests work
on a fresh machine; when it is up to date the script returns at once.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import wait_for  # noqa: F401  (tests import it from here too)

ROOT = Path(__file__).resolve().parent.parent
IMAGE_NAME = "djinn-test"


@dataclass(frozen=True)
class QemuImage:
    disks: Path  # the built image's disks directory (var/images)
    path: Path  # <disks>/_base/qemu/x86_64/djinn-test
    key: Path  # root's private key for the image

    def disks_with(self, tmp: Path, name: str = IMAGE_NAME) -> Path:
        """A disks directory of our own in which `name` (may contain /) is the test image.

        A symlink: QEMU in snapshot mode never writes to it, and each test's VMs are
        found by this directory in their command lines.
        """
        target = tmp / "disks" / "_base" / "qemu" / "x86_64" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(self.path)
        return tmp / "disks"


@pytest.fixture(scope="session")
def qemu_image() -> QemuImage:
    """The test image, built (or found up to date) by scripts/qemu-test-image."""
    disks = ROOT / "var" / "images"
    res = subprocess.run(
        [str(ROOT / "scripts" / "qemu-test-image"), str(disks)], capture_output=True, text=True, timeout=900
    )
    if res.returncode != 0:
        raise RuntimeError(f"scripts/qemu-test-image failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    key = next(line.split(": ", 1)[1] for line in res.stdout.splitlines() if line.startswith("key: "))
    return QemuImage(disks, disks / "_base" / "qemu" / "x86_64" / IMAGE_NAME, Path(key))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pid_alive(pid: int | None) -> bool:
    """Whether the process runs (a zombie counts as dead)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def qemu_processes(marker: str) -> list[int]:
    """Live qemu-system processes whose command line mentions `marker` (e.g. a test's disks dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"qemu-system") and marker.encode() in b" ".join(argv):
            if pid_alive(int(entry)):
                found.append(int(entry))
    return found


def listening(port: int | None) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    if port is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


