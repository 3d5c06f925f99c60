"""Where qemu base images are found: the worker's `<disks>/_base/qemu/x86_64/<image>` and
upstream's offline runner's `<disks>/qemu/x86_64/<image>`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from qemu_support import QemuImage, qemu_processes

from djinn.drivers.qemu import image_path

DJINN = shutil.which("djinn", path=str(Path(sys.executable).parent)) or "djinn"
MEMORY = 512  # MiB
BOOT = 300  # seconds at most for the interrupted build to end


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


def test_offline_runner_finds_an_image_in_upstreams_layout_through_the_xdg_driver_config(qemu_image: QemuImage, tmp_path):
    """The image is found and QEMU starts on it; the build is then interrupted (a full boot is
    test_qemu_driver's business), and nothing is left running."""
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
        "driver: {type: qemu, image: djinn-test}\nstages: [a]\njobs:\n  - {stage: a, commands: ['echo inside']}\n"
    )
    proc = subprocess.Popen(
        [DJINN], cwd=work, env={**os.environ, "XDG_CONFIG_HOME": str(xdg)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Booting machine with image djinn-test"):
            break
    assert seen and seen[-1].startswith("Booting machine with image djinn-test"), "".join(seen)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(BOOT) == 1, "".join(seen) + rest
    assert "not found" not in rest
    assert rest.rstrip().splitlines()[-1] == "==> Build killed"
    assert qemu_processes(str(disks)) == []


def test_offline_runner_names_the_worker_layout_when_the_image_is_in_neither(tmp_path):
    (tmp_path / "disks").mkdir()
    (tmp_path / "driver.conf").write_text(f'driver qemu {{\n\tdisks "{tmp_path / "disks"}"\n}}\n')
    (tmp_path / ".djinn.yml").write_text("driver: {type: qemu, image: nowhere}\nstages: [a]\njobs:\n  - {stage: a, commands: ['true']}\n")
    res = subprocess.run([DJINN, "-driver", "driver.conf"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert f"qemu image nowhere not found at {tmp_path / 'disks' / '_base' / 'qemu' / 'x86_64' / 'nowhere'}" in res.stdout
