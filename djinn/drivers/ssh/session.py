"""Running job scripts on the server: one exec channel per job, and killing what it left.

A private directory `/tmp/.djinn-<random>` (mode 0700; the home directory
when /tmp is not writable) holds the environment wrapper, the job scripts
while they run and their pid files. It is removed by `destroy` (`close`);
files the jobs write into the workspace stay, as the host is not ours to wipe.

The build environment is written into the wrapper script (`export K='v'`,
mode 0700) rather than sent as SSH `env` requests: those need `AcceptEnv`
on the server and sshd drops refused ones silently, and putting the values on
the command line would show masked values in the remote `ps`. Variables whose
names are not shell names are left out (with a line in the setup output), as
only env(1) on a command line could set them.

Each job runs as `exec /bin/sh <wrapper> <script> <pidfile>`, so the job's
shell is the session leader sshd made (setsid) and its pid names the job's
process group. Closing a channel does not stop remote processes, so `cancel`
(and a job whose background children keep its output open after it exited)
SIGKILLs that group through a second exec channel.
"""

from __future__ import annotations

import io
import posixpath
import re
import secrets
import shlex
import signal
import threading
import time
from typing import Mapping

import paramiko

from djinn.drivers.base import Output
from djinn.drivers.environment import refused_names_message, shell_exports
from djinn.drivers.ssh.connect import Connection
from djinn.drivers.ssh.files import CHUNK, Files
from djinn.errors import DriverError

#: After a job's shell exited: how long its channel may stay open (background
#: children holding the output) before they are killed, then how long to drain.
SETTLE_SECONDS = 0.3
DRAIN_SECONDS = 2.0
#: Bound on the small commands the driver runs itself (kill), and on removing the private directory.
CONTROL_TIMEOUT = 10.0

KILLED = -signal.SIGKILL


def _q(text: str) -> str:
    return shlex.quote(text)


class Session:
    """Job scripts run over the connection's transport, through the wrapper in a private directory."""

    def __init__(self, connection: Connection, files: Files) -> None:
        self.connection = connection
        self.files = files
        self.private_dir: str | None = None
        self._wrapper: str | None = None
        self._channel: paramiko.Channel | None = None
        self._pidfile: str | None = None
        self._kill_lock = threading.Lock()  # one remote kill per job, finished before anything closes
        self._killed: str | None = None

    def open(self, env: Mapping[str, str], log: Output | None = None) -> None:
        """After Files.open (SFTP open, workspace found): make the private directory, write the environment wrapper."""
        self.private_dir = self._make_private_dir()
        self._wrapper = f"{self.private_dir}/run"
        script, refused = self._wrapper_script(env)
        if refused and log is not None:
            log(refused_names_message(refused))
        self.files.write(self._wrapper, io.BytesIO(script), 0o700)

    def _make_private_dir(self) -> str:
        sftp, home = self.files.sftp, self.files.home
        assert sftp is not None and home is not None
        errors = []
        for base in ("/tmp", home):
            path = posixpath.join(base, f".djinn-{secrets.token_hex(8)}")
            try:
                sftp.mkdir(path, 0o700)
                sftp.chmod(path, 0o700)  # mkdir's mode is subject to the server's umask
                return path
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        raise DriverError(f"cannot make a directory for job scripts on {self.connection.address}: {'; '.join(errors)}")

    def _wrapper_script(self, env: Mapping[str, str]) -> tuple[bytes, list[str]]:
        """sh script: records its pid (= the job's process group), enters the workspace, execs the job with the env.

        Also the names left out because a shell cannot set them.
        """
        assert self.files.workspace is not None
        lines = [
            "#!/bin/sh",
            "# Written by djinn: runs a job script ($1) with the build environment; pid to $2.",
            'echo $$ > "$2"',
            f"cd {_q(self.files.workspace)} || exit 1",
        ]
        exports, refused = shell_exports(env)
        script = ("\n".join(lines) + "\n").encode() + exports + b'exec /bin/sh "$1"\n'
        return script, refused

    # --- jobs ---------------------------------------------------------------

    def execute(self, name: str, script: bytes, output: Output) -> int:
        """Run one job script (after `open`), streaming its output; its exit status, KILLED when cancelled."""
        assert self.private_dir is not None
        safe = re.sub(r"[^A-Za-z0-9._-]", "-", name) or "job"
        path = f"{self.private_dir}/{safe}.sh"
        pidfile = f"{self.private_dir}/{safe}.pid"
        try:
            self.files.write(path, io.BytesIO(script), 0o755)
            try:
                return self._run(path, pidfile, output)
            finally:
                self.files.remove(path, pidfile)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self.connection.cancelled.is_set():
                return KILLED
            raise self.connection.failure(f"running job {name}", exc) from None

    def _run(self, path: str, pidfile: str, output: Output) -> int:
        assert self._wrapper is not None
        connection = self.connection
        channel = connection.require().open_session(timeout=CONTROL_TIMEOUT)
        try:
            channel.set_combine_stderr(True)
            with connection.lock:
                if connection.cancelled.is_set():
                    return KILLED
                self._channel, self._pidfile, self._killed = channel, pidfile, None
            # `exec` so the wrapper replaces the login shell, the session leader sshd made
            # with setsid(): its pid is the job's process group, which cancel kills.
            channel.exec_command(f"exec /bin/sh {_q(self._wrapper)} {_q(path)} {_q(pidfile)}")
            channel.settimeout(0.2)
            exited_at: float | None = None
            swept = False
            while True:
                try:
                    data = channel.recv(CHUNK)
                except TimeoutError:  # socket.timeout
                    if connection.cancelled.is_set():
                        self.kill_running()
                        return KILLED
                    if channel.status_event.is_set():
                        # The shell exited but background children still hold the output.
                        now = time.monotonic()
                        if exited_at is None:
                            exited_at = now
                        elif not swept and now - exited_at > SETTLE_SECONDS:
                            self._kill_job(pidfile)
                            swept = True
                        elif now - exited_at > SETTLE_SECONDS + DRAIN_SECONDS:
                            break
                    continue
                if not data:
                    break
                output(data)
            # The output ended (EOF); the exit status follows it, before the channel closes.
            while not channel.status_event.wait(0.1):
                if connection.cancelled.is_set() or channel.closed or not connection.require().is_active():
                    break
            if connection.cancelled.is_set():
                self.kill_running()
                return KILLED
            if not channel.status_event.is_set():
                if not connection.require().is_active():
                    raise DriverError(f"the SSH connection to {connection.address} was lost during the job")
                output(b"\ndjinn: the job ended without an exit status (killed by a signal?)\n")
                return -1
            return int(channel.exit_status)
        except BaseException:
            self.kill_running()  # never leave the job running behind an error
            raise
        finally:
            with connection.lock:
                self._channel = self._pidfile = None
            channel.close()

    def run_command(self, command: str, timeout: float = CONTROL_TIMEOUT) -> tuple[int, bytes]:
        """Run a short control command (sh syntax) on the remote side: (exit status, output).

        For the driver's own housekeeping (and the qemu driver's), not for jobs.
        Output beyond 64 KiB is dropped; -1 when no exit status came. Raises
        DriverError when the connection fails or the command outlives `timeout`.
        """
        try:
            channel = self.connection.require().open_session(timeout=timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self.connection.failure("running a command", exc) from None
        try:
            channel.set_combine_stderr(True)
            channel.settimeout(timeout)
            channel.exec_command(f"exec /bin/sh -c {_q(command)}")
            out = bytearray()
            while data := channel.recv(CHUNK):
                if len(out) < 65536:
                    out += data
            end = time.monotonic() + timeout
            while not channel.status_event.wait(0.05):
                if channel.closed or time.monotonic() > end:
                    break
            return channel.exit_status, bytes(out[:65536])
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self.connection.failure("running a command", exc) from None
        finally:
            channel.close()

    def _kill_job(self, pidfile: str) -> None:
        """SIGKILL the job's process group (fallback: its shell), waiting briefly for the pid file."""
        script = (
            f'f={_q(pidfile)}; p=; i=0; while [ "$i" -lt 20 ]; do p=$(cat "$f" 2>/dev/null); '
            '[ -n "$p" ] && break; i=$((i+1)); sleep 0.1; done; '
            '[ -n "$p" ] && { kill -9 -"$p" 2>/dev/null || kill -9 "$p" 2>/dev/null; }; true'
        )
        try:
            self.run_command(script, timeout=CONTROL_TIMEOUT)
        except DriverError:
            pass  # connection gone: nothing more we can do from here

    # --- ending -------------------------------------------------------------

    def kill_running(self) -> None:
        """Kill the running job's processes once; whoever comes second waits for the first.

        Both the cancelling thread and the job's own thread call this, so `execute`
        returns (and the runner goes on to `destroy`, closing the connection) only
        after the remote kill has run.
        """
        with self.connection.lock:
            channel, pidfile = self._channel, self._pidfile
        if channel is None or pidfile is None:
            return
        with self._kill_lock:
            if self._killed != pidfile:
                transport = self.connection.transport
                if transport is not None and transport.is_active():
                    self._kill_job(pidfile)
                self._killed = pidfile
        channel.close()

    def close(self) -> None:
        """Remove the private directory, once, while SFTP and the connection are still up."""
        with self.connection.lock:
            private, self.private_dir = self.private_dir, None
        sftp, transport = self.files.sftp, self.connection.transport
        if private is None or sftp is None or transport is None or not transport.is_active():
            return
        try:
            sftp.get_channel().settimeout(CONTROL_TIMEOUT)  # a hung link must not hang destroy
            for name in sftp.listdir(private):
                sftp.remove(f"{private}/{name}")
            sftp.rmdir(private)
        except (OSError, EOFError, paramiko.SSHException):
            pass
