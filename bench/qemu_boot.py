#!/usr/bin/env python3
"""Boot-to-first-job-output of the qemu driver against a bare QEMU boot plus an SSH retry loop.

Both sides boot the same test image (scripts/qemu-test-image) with the same QEMU
flags; runs alternate so the machine's noise hits both alike. Bare: start
qemu-system-x86_64, retry paramiko's SSHClient.connect (1 s per attempt) as root
with the empty password, run `echo hello`, stop at its first output byte.
Driver: QEMUDriver.create() then execute() of a job script echoing hello, stop at
the job's first output byte; cold (the first build of the image, which also saves
the running machine) and warm (a later build, restored from that saved state).
Targets (issue 14), of medians against the bare cold boot: cold <= 1.1, warm <= 0.25.

    .venv/bin/python bench/qemu_boot.py [--rounds 5] [--memory 512]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paramiko
from targets import report

from djinn.drivers.qemu import QEMUDriver, kvm_usable
from djinn.runner.output import job_script

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "djinn-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare(image: Path, memory: int, accel: str) -> float:
    """Seconds from starting QEMU by hand to the first byte of `echo hello` over SSH."""
    port = free_port()
    command = [
        "qemu-system-x86_64", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-smp", "1", "-m", str(memory), "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-drive", f"file={image},if=virtio,format=qcow2,snapshot=on",
        "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22",
    ]
    started = time.perf_counter()
    vm = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if vm.poll() is not None:
                sys.exit(f"bare qemu exited with status {vm.returncode}")
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect("127.0.0.1", port, username="root", password="", timeout=1, banner_timeout=1,
                               auth_timeout=30, look_for_keys=False, allow_agent=False)
                break
            except (OSError, EOFError, paramiko.SSHException):
                client.close()
                time.sleep(0.2)
        _, stdout, _ = client.exec_command("echo hello")
        stdout.channel.recv(1)
        elapsed = time.perf_counter() - started
        client.close()
        return elapsed
    finally:
        vm.kill()
        vm.wait()


def driver(disks: Path, memory: int, warm: bool = True) -> float:
    """Seconds from QEMUDriver.create() to the first output byte of a job."""
    first = threading.Event()
    stamp: list[float] = []

    def output(data: bytes) -> None:
        if not first.is_set():
            stamp.append(time.perf_counter())
            first.set()

    d = QEMUDriver({"image": IMAGE, "disks": str(disks), "cpus": 1, "memory": memory, "accel": "auto", "warm": warm})
    started = time.perf_counter()
    try:
        d.create({}, lambda data: None)
        d.execute("bench", job_script(["echo hello"]), output)
    finally:
        d.destroy()
    if not stamp:
        sys.exit("the driver's job printed nothing")
    return stamp[0] - started


def disks_with_image(root: Path, image: Path) -> Path:
    """A disks directory of its own (so its saved states are too) in which IMAGE is the test image."""
    target = root / "_base" / "qemu" / "x86_64" / IMAGE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(image)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="boots of each kind (default 5)")
    parser.add_argument("--memory", type=int, default=512, help="guest MiB (default 512)")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # paramiko logs every refused attempt while the guest boots

    res = subprocess.run([str(ROOT / "scripts" / "qemu-test-image")], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stdout + res.stderr)
    disks = ROOT / "var" / "images"
    image = disks / "_base" / "qemu" / "x86_64" / IMAGE
    accel = "kvm" if kvm_usable() else "tcg"
    print(f"image {image}, accel {accel}, {args.memory} MiB, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="djinn-bench-qemu-") as tmp:
        # The warm side restores the state one cold boot saved; each cold round saves into a new directory.
        warm_disks = disks_with_image(Path(tmp) / "warm", image)
        print(f"saving the machine state: {driver(warm_disks, args.memory):.2f}s", flush=True)
        times: dict[str, list[float]] = {"bare": [], "cold": [], "warm": []}
        runs = {
            "bare": lambda i: bare(image, args.memory, accel),
            "cold": lambda i: driver(disks_with_image(Path(tmp) / f"cold{i}", image), args.memory),
            "warm": lambda i: driver(warm_disks, args.memory),
        }
        names = list(runs)
        for i in range(args.rounds):
            # Rotate which goes first, so a trend in the machine's load favours none of them.
            for name in names[i % 3:] + names[: i % 3]:
                times[name].append(runs[name](i))
                print(f"round {i + 1}: {name:5} {times[name][-1]:6.2f}s", flush=True)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"bare qemu + ssh loop (cold boot):      median {med['bare']:.2f}s  (min {min(times['bare']):.2f}s)")
    print(f"qemu driver, cold boot saving a state: median {med['cold']:.2f}s  (min {min(times['cold']):.2f}s)")
    print(f"qemu driver, restored from the state:  median {med['warm']:.2f}s  (min {min(times['warm']):.2f}s)")
    report([("qemu_cold", med["cold"] / med["bare"], "<=", 1.1), ("qemu_warm", med["warm"] / med["bare"], "<=", 0.25)])

if __name__ == "__main__":
    main()
