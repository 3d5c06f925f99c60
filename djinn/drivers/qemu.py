"""The qemu driver: each build runs in a fresh QEMU virtual machine, reached over SSH.

The VM boots `<disks>/_base/qemu/x86_64/<image>` (a disk that boots on its own)
with the disk in snapshot mode: every write goes to a throw-away overlay, so the
base image stays byte-identical and builds never see each other's changes.
QEMU's user-mode network forwards a free loopback port to the guest's port 22;
once SSH answers, the driver logs in as root (empty password, as Djinn images
allow, or a configured key/password) and hands every job to the ssh driver's
session code. The VM is killed when the build ends, whatever the reason.

Settings (driver config merged with the manifest's driver map):
`image` (required; may contain `/`), `disks`, `cpus`, `memory` (MiB),
`accel` (`kvm`, `tcg` or `auto`: KVM only when /dev/kvm opens AND the CPU
advertises vmx/svm, since a present but broken /dev/kvm hangs guests), and
optionally `key`/`password`/`user` for the login and `timeout` for the boot
(default: the runner's 5-minute driver-creation limit).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

from djinn.config.language import format_duration
from djinn.config.settings import QemuSettings, setting
from djinn.drivers import leftovers
from djinn.drivers.base import BuildIdentity, Driver, Output
from djinn.drivers.ssh import SSHDriver, SSHRunSettings
from djinn.errors import DriverError

ARCH = "x86_64"
#: Per-build directories (QEMU's log and snapshot overlay) are <tmp>/djinn-qemu-*, with an owner marker.
DIR_PREFIX = "djinn-qemu-"
QEMU = f"qemu-system-{ARCH}"
#: Bound on booting until SSH answers, when no `timeout` setting is given (the runner's creation limit).
DEFAULT_BOOT_TIMEOUT = 5 * 60.0
#: Each SSH attempt while the guest boots: QEMU accepts the TCP connection before the
#: guest listens, and a SYN lost before the guest's network came up is retried late.
ATTEMPT_TIMEOUT = 1.0
#: How often to look whether a freshly started QEMU has bound its forwarded port.
LISTEN_POLL = 0.01
#: Attempts at a free port when another process takes the one picked first.
PORT_ATTEMPTS = 20
#: Lines of the QEMU log (its errors and the guest's serial console) quoted in errors.
LOG_TAIL_LINES = 25
LOG_TAIL_BYTES = 64 * 1024
FORWARD_ERROR = "Could not set up host forwarding rule"

#: Ports handed to VMs of this process that may not be listening yet (builds start concurrently).
_reserved_ports: set[int] = set()
_ports_lock = threading.Lock()


def kvm_usable() -> bool:
    """/dev/kvm opens read-write and the CPU advertises hardware virtualisation (vmx or svm)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and re.search(r"\b(vmx|svm)\b", line):
                    return True
    except OSError:
        pass
    return False


def resolve_accel(accel: str) -> str:
    """`kvm` or `tcg` for an `accel` setting of kvm, tcg or auto."""
    if accel == "auto":
        return "kvm" if kvm_usable() else "tcg"
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise DriverError("the qemu driver's accel is kvm but /dev/kvm is missing or not usable; use accel tcg or auto")
    if accel not in ("kvm", "tcg"):
        raise DriverError(f"unknown qemu accel {accel!r} (expected one of: auto, kvm, tcg)")
    return accel


def image_path(disks: str, image: str) -> Path:
    """The base image: `<disks>/_base/qemu/x86_64/<image>` (the worker's layout), else
    `<disks>/qemu/x86_64/<image>` (upstream's offline runner's layout), whichever is a file;
    the first when neither is. Names may contain `/` but may not leave those directories.
    """
    if not image:
        raise DriverError("the qemu driver needs an image: set driver.image in the manifest")
    parts = image.split("/")
    if image.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DriverError(f"invalid qemu image name {image!r}: use a relative name such as debian/12")
    candidates = [Path(disks).joinpath(*layout, "qemu", ARCH, *parts) for layout in (("_base",), ())]
    return next((path for path in candidates if path.is_file()), candidates[0])


def user_image_path(disks: str, user_id: int, hash_: str) -> str:
    """A user's own image (an `images` row), `<disks>/<user_id>/qemu/<hash>`, as the server stores uploads."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", hash_ or ""):
        raise DriverError(f"invalid qemu image hash {hash_!r} in the images table")
    return str(Path(disks) / str(int(user_id)) / "qemu" / hash_)


def _free_port() -> int:
    """A loopback port nothing listens on now, not handed to another VM of this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with _ports_lock:
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port
    raise DriverError("no free loopback port for the VM's SSH forwarding")


def _release_port(port: int | None) -> None:
    if port is not None:
        with _ports_lock:
            _reserved_ports.discard(port)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1:port (from /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(fields[9])
    except OSError:
        pass
    return inodes


def _process_listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the listening socket of 127.0.0.1:port."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        for fd in os.listdir(fd_dir):
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    except OSError:
        pass
    return False


def _opt(value: str) -> str:
    """A value inside a QEMU option list, where a comma is written twice."""
    return value.replace(",", ",,")



@dataclass(frozen=True)
class QemuRunSettings(QemuSettings):
    """What one build's qemu driver reads: the driver config's block plus the manifest's keys.

    `user_image` is set by the worker (never by a manifest) when the build's user has an
    image of that name. The rest is how to log in to the guest.
    """

    image: str = setting("")
    user_image: str = setting("")
    timeout: datetime.timedelta = setting(datetime.timedelta(seconds=DEFAULT_BOOT_TIMEOUT), check="duration")
    user: str = setting("root", check="nonempty_string")
    password: str | None = setting(None, secret=True)
    key: str | None = setting(None, check="nonempty_string")


class QEMUDriver(Driver):
    """One VM per build, its jobs run through an SSHDriver session (composition, as upstream)."""

    type = "qemu"
    Settings = QemuRunSettings
    settings: QemuRunSettings

    def __init__(self, values: Mapping[str, Any] | None = None, identity: BuildIdentity | None = None, *, configured: Any = None) -> None:
        super().__init__(values, identity, configured=configured)
        s = self.settings
        self.image = s.image
        self.user_image = s.user_image
        self.disks = s.disks
        self.cpus = s.cpus
        self.memory = s.memory
        self.accel_setting = s.accel
        self.boot_timeout = s.timeout.total_seconds()
        self.ssh = SSHDriver(configured=SSHRunSettings(timeout=s.timeout, user=s.user, password=s.password, key=s.key))
        self.accel: str | None = None
        self.port: int | None = None
        self.pid: int | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    @classmethod
    def check(cls, configured: Any) -> None:
        """At worker start-up: QEMU is installed and the configured acceleration can work."""
        settings = cls.settings_of(configured)
        if shutil.which(QEMU) is None:
            raise DriverError(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)")
        resolve_accel(settings.accel)
        disks = settings.disks
        if not os.path.isdir(disks):
            raise DriverError(f"the qemu driver's disks directory {disks} does not exist")

    # --- booting ------------------------------------------------------------

    def create(self, env: Mapping[str, str], log: Output) -> None:
        started = time.monotonic()
        deadline = started + self.boot_timeout
        path = Path(self.user_image) if self.user_image else image_path(self.disks, self.image)
        if not path.is_file():
            raise DriverError(f"qemu image {self.image} not found at {path}")
        if shutil.which(QEMU) is None:
            raise DriverError(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)")
        self.accel = resolve_accel(self.accel_setting)
        log(
            f"Running with QEMU driver...\nBooting machine with image {self.image} "
            f"({self.accel}, {self.cpus} CPU{'s' if self.cpus != 1 else ''}, {self.memory} MiB)...\n".encode()
        )
        self.workdir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        leftovers.write_marker(self.workdir, self.identity)
        self.log_path = self.workdir / "qemu.log"
        try:
            self._boot(path, deadline, env)
        except BaseException:
            self._kill_vm()  # a VM that did not come up is of no use; destroy() removes the rest
            raise
        log(
            f"Established SSH connection to machine as {self.ssh.user} after {format_duration(time.monotonic() - started)} "
            f"(port {self.port})...\n".encode()
        )

    def _boot(self, path: Path, deadline: float, env: Mapping[str, str]) -> None:
        self._launch(path, deadline)
        try:
            # One attempt at a time, each bounded: QEMU accepts a connection before the guest
            # listens and keeps delivering abandoned ones once it is up, so many parallel or
            # very short attempts would pile up in the guest's sshd (MaxStartups).
            assert self.port is not None  # set by _launch
            self.ssh.connect("127.0.0.1", self.port, deadline=deadline, attempt_timeout=ATTEMPT_TIMEOUT,
                             alive=self._check_alive)
        except DriverError as exc:
            if self._cancelled.is_set():
                raise DriverError("booting the machine was cancelled") from None
            self._check_alive()
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"the machine did not let us in over SSH within {format_duration(self.boot_timeout)}: {exc}"
                    f"{self._log_tail()}"
                ) from None
            raise DriverError(f"{exc}{self._log_tail()}") from None
        self.ssh.start(env)

    def _command(self, path: Path, port: int) -> list[str]:
        with open(path, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
        # setpriv --pdeathsig: the VM is killed by the kernel if the thread that started it
        # dies (the worker killed with SIGKILL), so no VM outlives its worker.
        guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        return [
            *guard,
            QEMU,
            "-name", _opt(f"djinn-{self.image}"),
            "-accel", self.accel or "tcg",
            # Every feature the accelerator offers; under TCG this includes RDRAND, so a
            # guest's random pool is ready at once instead of stalling sshd's start.
            "-cpu", "host" if self.accel == "kvm" else "max",
            "-smp", str(self.cpus),
            "-m", str(self.memory),
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-serial", "stdio",
            "-drive", f"file={_opt(str(path))},if=virtio,format={fmt},snapshot=on",
            "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22",
        ]

    def _launch(self, path: Path, deadline: float) -> None:
        """Start QEMU on a free port; pick another when a concurrent process took it first."""
        assert self.workdir is not None and self.log_path is not None
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            self.port = port
            with open(self.log_path, "ab") as log_file, self._lock:
                if self._cancelled.is_set():
                    raise DriverError("booting the machine was cancelled")
                # TMPDIR: where QEMU would put a snapshot overlay; inside our directory, removed with it.
                env = {**os.environ, "TMPDIR": str(self.workdir)}
                self._process = subprocess.Popen(
                    self._command(path, port),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
                self.pid = self._process.pid
                # Which process is the VM, for the start-up sweep after a crash (djinn.drivers.leftovers).
                vm = leftovers.identity(self.pid)
                leftovers.write_marker(self.workdir, self.identity, vm_pid=vm["pid"], vm_started=vm["started"])
            process = self._process
            while True:
                if process.poll() is not None:
                    break
                if _process_listens(process.pid, port):
                    return
                if self._cancelled.is_set():
                    raise DriverError("booting the machine was cancelled")
                if time.monotonic() > deadline:
                    raise DriverError(f"{QEMU} did not start within the boot timeout{self._log_tail()}")
                time.sleep(LISTEN_POLL)
            text = self._log_text()
            _release_port(port)
            self.port = None
            if FORWARD_ERROR in text:
                # Another process bound the port between our check and QEMU's bind: try another.
                self.log_path.write_bytes(b"")
                continue
            raise self._start_error(path, process.returncode, text)
        raise DriverError(f"{QEMU} could not forward any of {PORT_ATTEMPTS} loopback ports to the VM{self._log_tail()}")

    def _start_error(self, path: Path, code: int, text: str) -> DriverError:
        if "lock" in text and "Failed to get" in text:
            first = next((line for line in text.splitlines() if "lock" in line), "").split(": ")[-1]
            return DriverError(
                f"qemu image {self.image} at {path} is locked by another process ({first}); "
                "is a VM or qemu-img using it without snapshot mode?"
            )
        return DriverError(f"{QEMU} exited with status {code} before booting{self._log_tail(text)}")

    def _check_alive(self) -> None:
        """Raise when the VM exited while we wait for SSH (a panic, a bad image, out of memory...)."""
        process = self._process
        if process is None or process.poll() is None:
            return
        if self._cancelled.is_set():
            raise DriverError("booting the machine was cancelled")
        raise DriverError(f"the machine exited with status {process.returncode} while booting{self._log_tail()}")

    def _log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, text: str | None = None) -> str:
        text = self._log_text() if text is None else text
        lines = [line.rstrip("\r") for line in text.replace("\r\n", "\n").splitlines() if line.strip()]
        if not lines:
            return ""
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"\n--- last lines of the QEMU log (errors and the guest's serial console) ---\n{tail}\n---"

    # --- jobs: the ssh driver's session -----------------------------------

    def key_location(self, name: str) -> str:
        return self.ssh.key_location(name)

    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        self.ssh.place(dest, data, mode)

    def execute(self, name: str, script: bytes, output: Output) -> int:
        try:
            code = self.ssh.execute(name, script, output)
        except DriverError as exc:
            raise DriverError(f"{exc}{self._vm_gone()}") from None
        if code != 0:
            transport = self.ssh.transport
            if transport is None or not transport.is_active():
                gone = self._vm_gone()
                if gone:
                    output(f"\ndjinn{gone}\n".encode())
        return code

    def _vm_gone(self) -> str:
        """When the VM itself stopped under a job (poweroff, panic): a note saying so, with its log."""
        process = self._process
        if self._cancelled.is_set() or process is None:
            return ""
        try:
            code = process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        return f": the machine exited with status {code}{self._log_tail()}"

    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        return self.ssh.collect(source)

    # --- ending -------------------------------------------------------------

    def cancel(self) -> None:
        """Kill the VM: a running create or execute returns at once, nothing new can run."""
        self._cancelled.set()
        self._kill_vm()
        # With the VM gone its connection ends at once, so the ssh driver's attempt to
        # kill the job's processes over it fails fast; the session refuses new work.
        self.ssh.cancel()

    def destroy(self) -> None:
        self.cancel()
        self.ssh.destroy()
        with self._lock:
            workdir, self.workdir = self.workdir, None
            port, self.port = self.port, None
        _release_port(port)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _kill_vm(self) -> None:
        with self._lock:
            process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _kill_stale_vm(directory: Path, owner: dict[str, Any]) -> list[str]:
    """Kill the VM a dead worker left running for `directory`, if it is still that process."""
    pid, started = owner.get("vm_pid"), owner.get("vm_started")
    if not isinstance(pid, int) or not leftovers.same_process(pid, started):
        return []
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return []
    return [f"{QEMU} process {pid} of build {owner.get('build_id') or '?'}"]


def sweep(root: str | None = None) -> list[str]:
    """Kill VMs and remove overlay directories whose worker process is gone.

    A worker calls it at start-up; a directory whose owner process is alive is
    never touched (djinn.drivers.leftovers). A VM normally dies with its worker,
    through setpriv --pdeathsig; this covers hosts without setpriv.
    """
    return leftovers.sweep(DIR_PREFIX, "VM directory", root, before_remove=_kill_stale_vm)


DRIVER = QEMUDriver
