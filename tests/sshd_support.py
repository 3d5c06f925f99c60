"""A real OpenSSH sshd on a free loopback port, for the ssh driver tests.

Session-scoped: one sshd for the whole run, with its own host key, config
and authorized key in a temporary directory, running as root in the
foreground (`-D -e`) and stopped at the end. It listens on 127.0.0.1 only
and allows two users:

- root, with the generated test key (`SSHServer.key`);
- `djinntest<pid>`, a user this fixture creates with an EMPTY password, as
  Djinn images have for root (both the `none` method and password "" log in).
  The empty password is accepted for that user only (a Match block); the user
  and its home are deleted when the session ends, and users left by killed
  runs (their pid gone) are deleted at the next start. The pid in the name
  keeps two test sessions on one machine apart.

Needs root and /usr/sbin/sshd; `scripts/sshd-deps` installs it (run here when missing).
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

SSHD = "/usr/sbin/sshd"
USER_PREFIX = "djinntest"
EMPTY_USER = f"{USER_PREFIX}{os.getpid()}"
REPO = Path(__file__).resolve().parent.parent

__all__ = ["EMPTY_USER", "SSHServer", "sshd"]


@dataclass
class SSHServer:
    host: str
    port: int
    key: Path  # private key authorized for root (and djinntest)
    other_key: Path  # a valid key that is NOT authorized
    empty_user: str
    empty_home: Path
    log: Path
    process: subprocess.Popen

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _keygen(path: Path) -> None:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "djinn-test", "-f", str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                pids.append(int(entry))
                            break
            except (OSError, ValueError):
                pass
    return pids


def _remove_user(name: str) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    if uid == 0:
        raise RuntimeError(f"refusing to remove {name}: it has uid 0")
    # Processes left running as that throwaway user (found by uid, killed by pid), then the user and its home.
    for pid in _pids_of_uid(uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["userdel", "--force", "--remove", name], stderr=subprocess.DEVNULL, check=False)


def _remove_stale_users() -> None:
    """Users of earlier runs that were killed before their teardown."""
    for entry in pwd.getpwall():
        suffix = entry.pw_name.removeprefix(USER_PREFIX)
        if suffix != entry.pw_name and suffix.isdigit() and not os.path.exists(f"/proc/{suffix}"):
            _remove_user(entry.pw_name)


def _create_user() -> Path:
    _remove_stale_users()
    _remove_user(EMPTY_USER)
    home = Path("/home") / EMPTY_USER
    _run("useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", EMPTY_USER)
    _run("passwd", "--delete", EMPTY_USER)
    return home


CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
# The key lives in a pytest temporary directory under /tmp (mode 1777).
StrictModes no
AllowUsers root {user}
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UsePAM no
AcceptEnv *
Subsystem sftp internal-sftp
LogLevel VERBOSE
MaxStartups 100:30:200
MaxAuthTries 10

# Djinn images: root with an empty password. Here only the throwaway test user.
Match User {user}
    PermitEmptyPasswords yes
"""


def _wait_ready(server: SSHServer, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.process.poll() is not None:
            break
        try:
            with socket.create_connection((server.host, server.port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not start on {server.address}:\n{server.log_text()}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """The running test sshd (see the module docstring)."""
    if os.geteuid() != 0:
        pytest.fail("the ssh driver tests run sshd as root and create a test user: run them as root")
    if not os.path.exists(SSHD):
        subprocess.run([str(REPO / "scripts" / "sshd-deps")], check=True)
    directory = tmp_path_factory.mktemp("sshd")
    _keygen(directory / "host_ed25519")
    _keygen(directory / "client_key")
    _keygen(directory / "other_key")
    (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
    # sshd's privilege separation directory; /run is emptied at boot.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    home = _create_user()
    process = None
    try:
        for _ in range(5):  # the free port may be taken between choosing and binding
            port = _free_port()
            config = directory / "sshd_config"
            config.write_text(CONFIG.format(port=port, dir=directory, user=EMPTY_USER))
            _run(SSHD, "-t", "-f", str(config))
            log = directory / "sshd.log"
            with open(log, "ab") as err:
                process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                           stdout=err, stderr=err, start_new_session=True)
            server = SSHServer("127.0.0.1", port, directory / "client_key", directory / "other_key",
                               EMPTY_USER, home, log, process)
            try:
                _wait_ready(server)
                break
            except RuntimeError:
                process.kill()
                process.wait()
                if "Address already in use" not in server.log_text():
                    raise
        else:
            raise RuntimeError("could not find a free port for sshd")
        yield server
    finally:
        if process is not None and process.poll() is None:
            # The listener, then every session it forked (same session id).
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _remove_user(EMPTY_USER)
