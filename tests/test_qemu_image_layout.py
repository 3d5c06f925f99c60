"""Where qemu base images are found: the worker's `<disks>/_base/qemu/x86_64/<image>` and
upstream's offline runner's `<disks>/qemu/x86_64/<image>`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from djinn.drivers.qemu import image_path
from qemu_support import QemuImage, qemu_processes

DJINN = shutil.which("djinn", path=str(Path(sys.executable).parent)) or "djinn"
MEMORY = 512  # MiB
BOOT = 300  # seconds at most for a guest to boot (TCG on a loaded 2-core machine)


def place(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"qcow2")
    return path


def test_image_found_in_either_layout_worker_layout_first(tmp_path):
    disks = str(tmp_path)
    worker_layout = tmp_path / "_base" / "qemu" / "x86_64" / "debian" / "12"
    offline_layout = tmp_path / "qemu" / "x86_64" / "debian" / "12"
    # Neither: the worker's layout is named (in the not-found message).
    assert image_path(disks, "debian/12") == worker_layout
    place(offline_layout)
    assert image_path(disks, "debian/12") == offline_layout
    place(worker_layout)
    assert image_path(disks, "debian/12") == worker_layout


def test_offline_runner_boots_an_image_in_upstreams_layout_from_the_xdg_driver_config(qemu_image: QemuImage, tmp_path):
    disks = tmp_path / "disks"
    image = disks / "qemu" / "x86_64" / "djinn-test"
    image.parent.mkdir(parents=True)
    image.symlink_to(qemu_image.path)
    xdg = tmp_path / "xdg"
    (xdg / "djinn").mkdir(parents=True)
    (xdg / "djinn" / "driver.conf").write_text(f'driver qemu {{\n\tdisks "{disks}"\n\tcpus 1\n\tmemory {MEMORY}\n}}\n')
    work = tmp_path / "work"
    work.mkdir()
    (work / ".djinn.yml").write_text(
        "driver: {type: qemu, image: djinn-test}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo inside $(uname -s)']}\n"
    )
    res = subprocess.run(
        [DJINN], cwd=work, env={**os.environ, "XDG_CONFIG_HOME": str(xdg)},
        capture_output=True, text=True, timeout=BOOT + 120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Booting machine with image djinn-test" in res.stdout
    assert "inside Linux" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1] == "==> Build passed"
    assert qemu_processes(str(disks)) == []
