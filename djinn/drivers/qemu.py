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
import logging
import os
import re
import secrets
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
from djinn.drivers import leftovers, qemu_state
from djinn.drivers.base import BuildIdentity, Driver, Output
from djinn.drivers.ssh import SSHDriver, SSHRunSettings
from djinn.errors import DriverError

_log = logging.getLogger(__name__)

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
#: After a restore the guest is up: fewer, more patient SSH attempts than while it boots.
RESTORED_LOGIN_SECONDS = 60.0
RESTORED_ATTEMPT_TIMEOUT = 10.0
#: Before a save: end sshd children that never logged in (boot-time attempts QEMU gave up on,
#: which would hold a restored sshd's MaxStartups slots), and print the pid of the sshd serving
#: our connection (the restored machine kills that one: its connection is gone).
QUIESCE = (  # the patterns are written so that this script's own text does not match them
    "if command -v pkill >/dev/null; then pkill -f 'sshd: .*\\[(pre[a]uth|accep[t]ed|ne[t])\\]'; else "
    "for p in /proc/[0-9]*; do [ ${p#/proc/} = $$ ] && continue; read -r c < $p/cmdline 2>/dev/null; case \"$c\" in "
    "*sshd:*[[]pre[a]uth]*|*sshd:*[[]accep[t]ed]*|*sshd:*[[]ne[t]]*) kill ${p#/proc/} 2>/dev/null;; esac; done; fi; echo $PPID"
)
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


def disk_format(path: Path) -> str:
    """qcow2 or raw, from the file's magic (QEMU must be told: guessing a raw image's format is unsafe)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def _octal(data: bytes) -> str:
    """`data` as printf(1) octal escapes (no xxd or base64 needed in the guest)."""
    return "".join(f"\\{byte:03o}" for byte in data)


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
        self.ssh = self._new_ssh()
        self._staging: Path | None = None  # a saved state this build made but did not publish: removed at the end
        self._sealing: threading.Thread | None = None  # the saved state being made durable while the build runs
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

    def _new_ssh(self) -> SSHDriver:
        s = self.settings
        return SSHDriver(configured=SSHRunSettings(timeout=s.timeout, user=s.user, password=s.password, key=s.key))

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
            self._boot(path, deadline, env, log)
        except BaseException:
            self._kill_vm()  # a VM that did not come up is of no use; destroy() removes the rest
            raise
        log(
            f"Established SSH connection to machine as {self.ssh.user} after {format_duration(time.monotonic() - started)} "
            f"(port {self.port})...\n".encode()
        )

    def _boot(self, path: Path, deadline: float, env: Mapping[str, str], log: Output) -> None:
        """Restore the image's saved machine when there is one, else boot cold (and save it when warm)."""
        warm = self._cache(path) if self.settings.warm else None
        if warm is not None:
            root, key = warm
            saved = qemu_state.SavedState.find(root, key)
            if saved is not None:
                try:
                    self._restore(saved, deadline)
                    self.ssh.start(env)
                    log(b"Restored the machine from its saved state\n")
                    return
                except qemu_state.MachineStateError as exc:
                    note = f"the saved machine state of image {self.image} cannot be used ({exc}); it is removed and the machine boots cold"
                    _log.warning("%s", note)
                    log(f"{note}\n".encode())
                    saved.discard()
                    self._kill_vm()
                    self.ssh.destroy()
                    self.ssh = self._new_ssh()
                    assert self.log_path is not None
                    self.log_path.write_bytes(b"")
            try:
                self._boot_and_save(path, root, key, deadline)
                self.ssh.start(env)
                return
            except qemu_state.MachineStateError as exc:
                # The machine is unusable (it is killed below); the build fails as a cold boot would.
                raise DriverError(f"booting the machine: {exc}{self._log_tail()}") from None
        self._launch(path, deadline, snapshot=True)
        self._connect(deadline)
        self.ssh.start(env)

    def _connect(self, deadline: float, attempt_timeout: float = ATTEMPT_TIMEOUT) -> None:
        try:
            # One attempt at a time, each bounded: QEMU accepts a connection before the guest
            # listens and keeps delivering abandoned ones once it is up, so many parallel or
            # very short attempts would pile up in the guest's sshd (MaxStartups).
            assert self.port is not None  # set by _launch
            self.ssh.connect("127.0.0.1", self.port, deadline=deadline, attempt_timeout=attempt_timeout,
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

    # --- saved machine states (djinn.drivers.qemu_state) ---------------------

    def _cache(self, path: Path) -> tuple[Path, str] | None:
        """Where this machine's saved state lives, and its key; None when states cannot be kept here."""
        root = Path(self.disks) / qemu_state.CACHE_DIR
        try:
            return root, qemu_state.machine_key(QEMU, self._devices(), path)
        except (OSError, qemu_state.MachineStateError) as exc:
            _log.warning("qemu image %s: no saved machine states (%s)", self.image, exc)
            return None

    def _restore(self, saved: qemu_state.SavedState, deadline: float) -> None:
        assert self.workdir is not None
        saved.check()
        disk = self.workdir / "disk.qcow2"
        qemu_state.overlay(disk, saved.disk, "qcow2")
        self._launch(disk, deadline, qmp=True, incoming=True)
        qmp = self._qmp()
        try:
            qemu_state.restore(qmp, saved, lambda: self._process is not None and self._process.poll() is None)
        finally:
            qmp.close()
        try:
            self._connect(min(deadline, time.monotonic() + RESTORED_LOGIN_SECONDS), attempt_timeout=RESTORED_ATTEMPT_TIMEOUT)
        except DriverError as exc:
            raise qemu_state.MachineStateError(f"the restored machine did not let us in: {exc}") from None
        # The restored clock and random state are the saved machine's: set one, stir the other
        # (the vmgenid device has the kernel reseed on its own when it sees the new generation id),
        # and end the sshd of the connection that was open when the machine was saved.
        stale = saved.session_pid()
        code, out = self.ssh.run_command(
            (f"kill {stale} 2>/dev/null; " if stale else "")
            + f"date -u -s @{int(time.time())} >/dev/null 2>&1; printf '{_octal(secrets.token_bytes(64))}' > /dev/urandom"
        )
        if code != 0:
            raise qemu_state.MachineStateError(f"could not set the restored machine's clock: {out.decode(errors='replace').strip()}")

    def _boot_and_save(self, path: Path, root: Path, key: str, deadline: float) -> None:
        """Boot cold on a disk the saved state keeps, wait for SSH, save the machine, and go on in a new layer."""
        assert self.workdir is not None
        staging = qemu_state.staging_dir(root, key)
        self._staging = staging
        qemu_state.overlay(staging / "disk.qcow2", path, disk_format(path))
        self._launch(staging / "disk.qcow2", deadline, qmp=True)
        self._connect(deadline)
        try:
            code, out = self.ssh.run_command(QUIESCE)
            session = out.decode(errors="replace").strip().splitlines()[-1:] if code == 0 else []
            if not session or not session[0].isdigit():
                raise qemu_state.MachineStateError(f"the guest did not answer as expected before saving: {out[-200:]!r}")
            qmp = self._qmp()
            try:
                description = {"image": self.image, "saved_at": time.time(), "session_pid": int(session[0])}
                partial = qemu_state.save(qmp, staging, self.workdir / "disk.qcow2")
            finally:
                qmp.close()
        except (DriverError, OSError) as exc:
            self._not_saved(exc)
            return
        # The machine runs on: its first job need not wait for the state to reach the disk.
        self._sealing = threading.Thread(
            target=self._seal, args=(staging, partial, description, root, key), name="qemu-seal", daemon=True
        )
        self._sealing.start()

    def _seal(self, staging: Path, partial: Path, description: dict[str, Any], root: Path, key: str) -> None:
        try:
            qemu_state.seal(staging, partial, description)
        except OSError as exc:
            self._not_saved(exc)
            return
        if qemu_state.publish(staging, root / key):
            self._staging = None
            removed = qemu_state.sweep(root, self.settings.warm_limit)
            for item in removed:
                _log.info("removed %s", item)

    def _not_saved(self, exc: Exception) -> None:
        _log.warning("qemu image %s: the machine's state was not saved (%s); the next build boots cold too", self.image, exc)

    def _qmp(self) -> qemu_state.QMP:
        assert self.workdir is not None
        return qemu_state.QMP(self.workdir / "qmp.sock", lambda: self._process is not None and self._process.poll() is None)

    def _devices(self) -> list[str]:
        """The machine: every argument but the disk file, the port and the monitor (a saved state's key)."""
        return [
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
            "-drive", "if=virtio,id=disk0",
            "-nic", "user,model=virtio-net-pci",
            # A new generation id in every restored machine makes its kernel reseed its random state.
            "-device", "vmgenid,guid=auto",
        ]

    def _command(self, path: Path, port: int, *, snapshot: bool = False, qmp: bool = False, incoming: bool = False) -> list[str]:
        devices = self._devices()
        drive = f"file={_opt(str(path))},if=virtio,id=disk0,format={disk_format(path)}"
        devices[devices.index("if=virtio,id=disk0")] = drive + (",snapshot=on" if snapshot else "")
        devices[devices.index("user,model=virtio-net-pci")] = f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22"
        # setpriv --pdeathsig: the VM is killed by the kernel if the thread that started it
        # dies (the worker killed with SIGKILL), so no VM outlives its worker.
        guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        monitor = ["-qmp", f"unix:{_opt(str(self.workdir / 'qmp.sock'))},server=on,wait=off"] if qmp and self.workdir else []
        return [*guard, QEMU, "-name", _opt(f"djinn-{self.image}"), *devices, *monitor, *(["-incoming", "defer"] if incoming else [])]

    def _launch(self, path: Path, deadline: float, **options: bool) -> None:
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
                    self._command(path, port, **options),
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
        if self._sealing is not None:
            self._sealing.join()  # published or not, it is decided before the staging copy may go
            self._sealing = None
        staging, self._staging = self._staging, None
        if staging is not None:  # its disk was the VM's, so it goes only now the VM is gone
            shutil.rmtree(staging, ignore_errors=True)

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


def sweep(root: str | None = None, settings: QemuSettings | None = None) -> list[str]:
    """Kill VMs and remove overlay directories whose worker process is gone; keep saved states in their bound.

    A worker calls it at start-up; a directory whose owner process is alive is
    never touched (djinn.drivers.leftovers). A VM normally dies with its worker,
    through setpriv --pdeathsig; this covers hosts without setpriv.
    """
    removed = leftovers.sweep(DIR_PREFIX, "VM directory", root, before_remove=_kill_stale_vm)
    if settings is not None and settings.warm:
        removed += qemu_state.sweep(Path(settings.disks) / qemu_state.CACHE_DIR, settings.warm_limit)
    return removed


DRIVER = QEMUDriver
