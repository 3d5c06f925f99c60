"""The docker driver: each job runs in its own container, a volume carries the workspace between them.

Settings: `host` and `version` (driver config; None = DOCKER_HOST or the local
socket, and a negotiated API version), `image` and `workspace` (manifest). The
build's identity (its id and the worker's name, from the worker daemon; a random
id and "offline" otherwise) labels every container and volume so `sweep` can
find what a dead worker left behind.

Why it looks the way it does (upstream made three containers per job):
- One container per job, and nothing else. The job script is handed to
  `/bin/sh -c` as the container's entrypoint, so no copy into the container is
  needed (a copy costs the engine ~50 ms); only a script too big for one
  argument is copied in as `/.djinn/<job>.sh` instead.
- The workspace volume is created by the engine with the first container (with
  its labels), saving a round trip. Objects and keys are buffered by `place` and
  copied in with one archive upload into the first job's container before it
  starts; keys live in a second volume at /root/.ssh so every later job has
  them too. Other absolute destinations are copied into every job's container.
- The build environment never goes into a container's config (where `docker
  inspect` shows it): it is written as `export` lines to /.djinn/env (mode
  0600, in a volume of the build uploaded with the first job), which each job's
  script sources before tracing starts.
- Output is read from an attach made before the container starts, so nothing
  is missed and nothing waits on the engine's log files; the container logs to
  nothing (masked values never reach the engine's disk).
- A job's container is kept until the next job has started, so artifacts can
  be copied out of it (also when it failed), then removed while the next job runs.
- Pipelined: starting a container is most of a short job's cost, so while a job
  runs the next job's container is made and started in the background, held at a
  gate (its shell waits for one line on stdin) until `execute` opens it. Those
  containers join the network of one holder container per build, made with the
  second job: joining a running container's network starts a container in a third
  of the time. Every container of the build carries its labels, so destroy and,
  after a crash, the sweep remove them all.
"""

from __future__ import annotations

import base64
import concurrent.futures
import fnmatch
import io
import json
import logging
import os
import posixpath
import struct
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Collection, Iterable, Iterator, Mapping, cast

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig, Mount

from djinn.config.settings import DockerSettings, setting
from djinn.drivers.base import BuildIdentity, Driver, Output, inline_script
from djinn.drivers.environment import refused_names_message, shell_exports
from djinn.errors import DriverError
from djinn.paths import PathEscapeError

log = logging.getLogger(__name__)

BUILD_LABEL = "djinn.build"
WORKER_LABEL = "djinn.worker"
JOB_LABEL = "djinn.job"
DEFAULT_WORKER = "offline"
#: Where keys go; a volume is mounted there when anything is placed under it.
SSH_DIR = "/root/.ssh"
#: Where a script too big for the command line is copied to, and where the env file is.
SCRIPT_DIR = "/.djinn"
ENV_FILE = f"{SCRIPT_DIR}/env"
SPOOL_SIZE = 8 << 20
READ_SIZE = 1 << 16
SIGKILL_STATUS = -9
#: A prepared job's entrypoint: wait for the go line, then run the job's own command, which
#: sees no stdin (as an ungated job). A gate closed without a go line ends the container.
GATE = 'read -r _ || exit 137; exec "$@" </dev/null'
#: The network holder's entrypoint: wait on a stdin nobody writes to, until it is removed.
HOLD = "read -r _; exit 0"
# Engine errors that mean "already gone" while removing things.
_GONE = (docker.errors.NotFound,)

# The engine errors we turn into DriverError: connection problems and API refusals.
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


# API versions negotiated per engine address: a warm worker skips the round trip on later builds.
_negotiated: dict[str, str] = {}


def _api_client(host: str | None, version: str | None) -> docker.APIClient:
    """A low-level client: DOCKER_HOST (and its TLS settings) unless `host` is given."""
    kwargs = docker.utils.kwargs_from_env()
    if host:
        kwargs["base_url"] = host
    key = str(kwargs.get("base_url"))
    try:
        if version:
            return docker.APIClient(version=version, **kwargs)
        if key in _negotiated:
            return docker.APIClient(version=_negotiated[key], **kwargs)
        api = docker.APIClient(version="auto", **kwargs)
        _negotiated[key] = api.api_version
        return api
    except _ENGINE_ERRORS as exc:
        raise DriverError(f"cannot reach the Docker engine at {_address(host)}: {_explain(exc)}") from None


def _address(host: str | None) -> str:
    """The engine's address as a user would write it, for messages."""
    return host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _Placement:
    """One file for the container: its path (without the leading /), mode and spooled content."""

    def __init__(self, path: str, data: BinaryIO, mode: int) -> None:
        self.path = path.lstrip("/")
        self.mode = mode
        self.data = tempfile.SpooledTemporaryFile(max_size=SPOOL_SIZE)
        while chunk := data.read(READ_SIZE):
            self.data.write(chunk)
        self.size = self.data.tell()

    def add_to(self, tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(self.path)
        info.size = self.size
        info.mode = self.mode
        info.mtime = int(time.time())
        self.data.seek(0)
        tar.addfile(info, self.data)

    def close(self) -> None:
        self.data.close()


@dataclass(frozen=True)
class DockerRunSettings(DockerSettings):
    """What one build's docker driver reads: the driver config's block plus the manifest's keys."""

    image: str = setting("")
    workspace: str = setting("")


class DockerDriver(Driver):
    type = "docker"
    Settings = DockerRunSettings
    settings: DockerRunSettings

    def __init__(self, values: Mapping[str, Any] | None = None, identity: BuildIdentity | None = None, *, configured: Any = None) -> None:
        super().__init__(values, identity, configured=configured)
        self.image = self.settings.image
        self.workspace = self.settings.workspace
        self.host = self.settings.host
        self.version = self.settings.version
        self.build_id = self.identity.build_id or uuid.uuid4().hex
        self.worker = self.identity.worker or DEFAULT_WORKER
        self.labels = {BUILD_LABEL: self.build_id, WORKER_LABEL: self.worker}
        suffix = uuid.uuid4().hex[:12]
        # Named per driver, not per build id alone: a rerun of a build must never see a stale workspace.
        self.volume = f"djinn-{self.build_id}-{suffix}"
        self.ssh_volume = f"{self.volume}-ssh"
        self.env_volume = f"{self.volume}-env"
        self.api: docker.APIClient | None = None
        self._has_env = False
        self._env_dir_mode = 0o700
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._running: str | None = None  # the started container cancel must kill
        self._containers: list[str] = []  # created and not yet removed, oldest first
        self._volumes: list[str] = []  # that containers may have created
        self._last: str | None = None  # the last job's container, for collect
        self._pending: list[_Placement] = []  # for the volumes, copied once
        self._overlay: list[_Placement] = []  # elsewhere, copied into every job's container
        self._ssh_used = False
        #: Containers started for jobs to come, by job name: (script, future of (container, attach socket)).
        self._prepared: dict[str, tuple[bytes, concurrent.futures.Future[tuple[str, Any]]]] = {}
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # see _background
        self._uploading = threading.Lock()  # the first container's upload takes the pending files
        self._holder: str | None = None  # see _network_holder
        self._holder_failed = False
        #: What destroy could not remove (left for the sweep).
        self.leftovers: list[str] = []

    @classmethod
    def check(cls, configured: Any) -> None:
        """At worker start-up: the Docker engine answers (a clear DriverError when it does not)."""
        settings = cls.settings_of(configured)
        api = _api_client(settings.host, settings.version)
        try:
            api.ping()
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot reach the Docker engine at {_address(settings.host)}: {_explain(exc)}") from None
        finally:
            api.close()

    # --- create -------------------------------------------------------------

    def create(self, env: Mapping[str, str], log: Output) -> None:
        if not self.image:
            raise DriverError("the docker driver needs an image (driver.image in the manifest)")
        ws = self.workspace
        if not ws.startswith("/") or posixpath.normpath(ws) == "/":
            raise DriverError(f"the docker workspace must be an absolute path other than /, got {ws!r}")
        self.workspace = posixpath.normpath(ws)
        if self._cancelled.is_set():
            raise DriverError("the build was cancelled")
        exports, refused = shell_exports(env)
        if refused:
            log(refused_names_message(refused))
        log(b"Running with Docker driver...\n")
        self.api = _api_client(self.host, self.version)
        image_id, user = self._ensure_image(log)
        log(f"Using Docker image {self.image} - {image_id}...\n".encode())
        if exports:
            # Private to root; an image that runs as another user must still be able to read it
            # (it is the build's own container either way: the point is keeping it out of inspect).
            as_root = user.split(":", 1)[0] in ("", "root", "0")
            self._env_dir_mode = 0o700 if as_root else 0o755
            self._pending.append(_Placement(ENV_FILE, io.BytesIO(exports), 0o600 if as_root else 0o644))
            self._has_env = True

    def _ensure_image(self, log: Output) -> tuple[str, str]:
        """The image's id and user: used when present, pulled when absent, else a DriverError naming it."""
        assert self.api is not None
        try:
            return _id_and_user(self.api.inspect_image(self.image))
        except docker.errors.ImageNotFound:
            pass
        except requests.exceptions.ConnectionError as exc:
            raise DriverError(f"cannot reach the Docker engine at {_address(self.host)}: {_explain(exc)}") from None
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot inspect Docker image {self.image!r}: {_explain(exc)}") from None
        log(f"Image {self.image} is not present, pulling it...\n".encode())
        error: list[str] = []
        done = threading.Event()
        api = self.api

        def pull() -> None:
            try:
                for event in api.pull(self.image, stream=True, decode=True):
                    if isinstance(event, dict) and event.get("error"):
                        error.append(str(event["error"]))
            except _ENGINE_ERRORS as exc:
                error.append(_explain(exc))
            finally:
                done.set()

        # A pull may take minutes: in a thread, so cancel (kill, creation limit) is not held up by it.
        threading.Thread(target=pull, name=f"djinn-pull-{self.build_id}", daemon=True).start()
        while not done.wait(0.1):
            if self._cancelled.is_set():
                raise DriverError(f"pulling Docker image {self.image!r} was cancelled")
        if error:
            raise DriverError(
                f"Docker image {self.image!r} is not present and could not be pulled: {error[-1]}"
            )
        try:
            return _id_and_user(self.api.inspect_image(self.image))
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"Docker image {self.image!r} was pulled but cannot be inspected: {_explain(exc)}") from None

    # --- place --------------------------------------------------------------

    def _in_workspace(self, path: str, what: str) -> str:
        """`path` (relative to the workspace, or absolute) as an absolute path, refused outside it."""
        full = posixpath.normpath(posixpath.join(self.workspace, path))
        if full != self.workspace and not full.startswith(self.workspace + "/"):
            raise PathEscapeError(f"{what} {path!r} leaves the workspace {self.workspace}; use a path inside it")
        return full

    def place(self, dest: str, data: BinaryIO, mode: int = 0o644) -> None:
        if self.api is None:
            raise DriverError("the docker driver was used before it was created")
        if dest.startswith("/"):
            full = posixpath.normpath(dest)
            if full == self.workspace:
                raise DriverError(f"object destination {dest!r} is the workspace itself; name a file")
            if full.startswith(self.workspace + "/"):
                self._pending.append(_Placement(full, data, mode))
            elif full.startswith(SSH_DIR + "/"):
                self._ssh_used = True
                self._pending.append(_Placement(full, data, mode))
            else:
                self._overlay.append(_Placement(full, data, mode))
        else:
            full = self._in_workspace(dest, "object destination")
            if full == self.workspace:
                raise DriverError(f"object destination {dest!r} is the workspace itself; name a file")
            self._pending.append(_Placement(full, data, mode))

    def _upload(self, container: str, extra: list[_Placement]) -> None:
        """Copy pending placements, the overlay and `extra` into a created container, in one archive."""
        items = [*self._pending, *self._overlay, *extra]
        if not items:
            return
        assert self.api is not None
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_SIZE) as archive:
            with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
                private = [(SSH_DIR, 0o700)] + ([(SCRIPT_DIR, self._env_dir_mode)] if self._has_env else [])
                for directory, mode in private:
                    if any(p.path.startswith(directory.lstrip("/") + "/") for p in items):
                        info = tarfile.TarInfo(directory.lstrip("/"))
                        info.type = tarfile.DIRTYPE
                        info.mode = mode
                        info.mtime = int(time.time())
                        tar.addfile(info)
                for item in items:
                    item.add_to(tar)
            archive.seek(0)
            try:
                self.api.put_archive(container, "/", archive)
            except _ENGINE_ERRORS as exc:
                raise DriverError(f"cannot copy objects and keys into the container: {_explain(exc)}") from None
        for item in self._pending:
            item.close()
        self._pending = []

    # --- execute ------------------------------------------------------------

    def _mounts(self) -> list[Mount]:
        labels = dict(self.labels)
        mounts = [Mount(target=self.workspace, source=self.volume, type="volume", labels=labels)]
        if self._ssh_used:
            mounts.append(Mount(target=SSH_DIR, source=self.ssh_volume, type="volume", labels=labels))
        if self._has_env:
            mounts.append(Mount(target=SCRIPT_DIR, source=self.env_volume, type="volume", labels=labels))
        return mounts

    def _make_container(self, name: str, script: bytes, gated: bool = False, network: str | None = None) -> str:
        """Create job `name`'s container and copy in what it needs (the first one also gets the volumes' files).

        gated: the script waits for a line on stdin first (see `prepare`), then runs with
        stdin from /dev/null as an ungated one does. network: a running container whose
        network the job joins.
        """
        assert self.api is not None
        api = self.api
        extra: list[_Placement] = []
        if self._has_env:
            # Sourced before the script's own first line, so `set -x` does not trace the values.
            script = f". {ENV_FILE}\n".encode() + script
        text = inline_script(script)
        if text is not None:
            entrypoint = ["/bin/sh", "-c", text, f"{name}.sh"]
        else:
            path = f"{SCRIPT_DIR}/{name}.sh"
            extra.append(_Placement(path, io.BytesIO(script), 0o755))
            entrypoint = ["/bin/sh", path]
        if gated:
            entrypoint = ["/bin/sh", "-c", GATE, "gate", *entrypoint]
        host_config = api.create_host_config(
            mounts=self._mounts(),
            log_config=LogConfig(type=LogConfig.types.NONE),
            **({"network_mode": f"container:{network}"} if network else {}),
        )
        with self._lock:
            # Volumes the engine may create with this container: destroy removes them.
            for volume in [m["Source"] for m in host_config["Mounts"]]:
                if volume not in self._volumes:
                    self._volumes.append(volume)
        try:
            container: str = api.create_container(
                self.image,
                entrypoint=entrypoint,
                working_dir=self.workspace,
                labels={**self.labels, JOB_LABEL: name},
                host_config=host_config,
                stdin_open=gated,
                tty=False,
            )["Id"]
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot create the container for job {name}: {_explain(exc)}") from None
        with self._lock:
            self._containers.append(container)
        try:
            with self._uploading:
                self._upload(container, extra)
        finally:
            for item in extra:
                item.close()
        return container

    def _background(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one thread that makes the next container and removes finished ones, in order."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"docker-{self.build_id}")
        return self._worker

    def prepare(self, name: str, script: bytes) -> None:
        """Start the next job's container in the background, held at a gate until its turn.

        Starting a container is most of what a short job costs (the engine sets up its
        namespaces and mounts); done while the current job runs, the next job begins
        the moment `execute` opens the gate.
        """
        with self._lock:
            if self.api is None or self._cancelled.is_set():
                return
            stale = self._prepared.pop(name, None)
            self._prepared[name] = (script, self._background().submit(self._start_gated, name, script))
        if stale is not None:
            self._discard(stale[1])

    def _start_gated(self, name: str, script: bytes) -> tuple[str, Any]:
        """Job `name`'s container, started and waiting at the gate, and its attach socket."""
        assert self.api is not None
        container = self._make_container(name, script, gated=True, network=self._network_holder())
        try:
            sock = self.api.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1, "logs": 0})
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot attach to the container for job {name}: {_explain(exc)}") from None
        try:
            if self._cancelled.is_set():
                raise DriverError(f"job {name} was cancelled before its container started")
            self.api.start(container)
        except _ENGINE_ERRORS as exc:
            _close(sock)
            raise DriverError(f"cannot start the container for job {name}: {_explain(exc)}") from None
        except BaseException:
            _close(sock)
            raise
        return container, sock

    def _network_holder(self) -> str | None:
        """The container whose network the prepared jobs join; None (their own network) if it cannot start.

        A container that joins a running one's network starts in a third of the time
        (the engine makes no new network for it), and leaves faster. The holder is made
        once per build, with the second job, and only waits; jobs still each get their
        own container, processes and filesystem.
        """
        if self._holder is None and not self._holder_failed:
            assert self.api is not None
            try:
                holder: str = self.api.create_container(
                    self.image,
                    entrypoint=["/bin/sh", "-c", HOLD],
                    labels={**self.labels, JOB_LABEL: "network"},
                    host_config=self.api.create_host_config(log_config=LogConfig(type=LogConfig.types.NONE)),
                    stdin_open=True,
                )["Id"]
                with self._lock:
                    self._containers.append(holder)
                self.api.start(holder)
                self._holder = holder
            except _ENGINE_ERRORS as exc:
                self._holder_failed = True
                log.warning("docker build %s: jobs get their own networks (the shared one did not start: %s)", self.build_id, _explain(exc))
        return self._holder

    def _discard(self, made: concurrent.futures.Future[tuple[str, Any]]) -> None:
        """Close and remove a prepared container no job will use (once it is made)."""

        def remove() -> None:
            if made.exception() is None:
                container, sock = made.result()
                _close(sock)
                self._remove_container(container)

        self._background().submit(remove)

    def execute(self, name: str, script: bytes, output: Output) -> int:
        if self.api is None:
            raise DriverError("the docker driver was used before it was created")
        if self._cancelled.is_set():
            return SIGKILL_STATUS
        api = self.api
        with self._lock:
            prepared = self._prepared.pop(name, None)
        started = None
        if prepared is not None:
            if prepared[0] == script and prepared[1].exception() is None:
                started = prepared[1].result()
            else:  # made for another script, or failed: this job's own try says why
                self._discard(prepared[1])
        if started is not None:
            container, sock = started
        else:
            container = self._make_container(name, script)
            try:
                sock = api.attach_socket(container, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0})
            except _ENGINE_ERRORS as exc:
                raise DriverError(f"cannot attach to the container for job {name}: {_explain(exc)}") from None
        previous = self._last
        with self._lock:
            self._last = container
        try:
            with self._lock:
                if self._cancelled.is_set():
                    return SIGKILL_STATUS
                if started is not None:
                    try:
                        getattr(sock, "_sock", sock).sendall(b"go\n")
                    except OSError as exc:
                        raise DriverError(f"cannot start job {name} in its container: {exc}") from None
                else:
                    try:
                        api.start(container)
                    except _ENGINE_ERRORS as exc:
                        raise DriverError(f"cannot start the container for job {name}: {_explain(exc)}") from None
                self._running = container
            # The previous job's container is no longer needed for artifacts: removed while this job runs.
            if previous is not None:
                self._background().submit(self._remove_container, previous)
            _stream(sock, output)
        finally:
            _close(sock)
            with self._lock:
                self._running = None
        try:
            return int(api.wait(container, timeout=None)["StatusCode"])
        except _ENGINE_ERRORS as exc:
            if self._cancelled.is_set():
                return SIGKILL_STATUS
            raise DriverError(f"cannot get the exit status of job {name}: {_explain(exc)}") from None

    # --- collect ------------------------------------------------------------

    def collect(self, source: str) -> Iterator[tuple[str, BinaryIO]]:
        full = self._in_workspace(source, "artifact source")
        container = self._last
        if self.api is None or container is None:
            raise DriverError("no job has run, so there is no container to collect artifacts from")
        if "*" in source:
            yield from self._collect_glob(container, full)
            return
        resolved = self._resolve(container, full, source)
        if resolved is None:
            return
        found = self._archive(container, resolved, source)
        if found is None:
            return
        chunks = found[0]
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), READ_SIZE), mode="r|") as tar:
            member = tar.next()
            if member is not None and member.isfile():
                stream = tar.extractfile(member)
                if stream is not None:
                    yield posixpath.relpath(full, self.workspace), cast(BinaryIO, stream)

    def _resolve(self, container: str, full: str, source: str) -> str | None:
        """`full` with every symlink along it resolved in the container; None when it does not exist.

        Refused (PathEscapeError) when any component leads out of the workspace. The job's
        container has exited, so nothing changes between this walk and the copy.
        """
        assert self.api is not None
        rest = posixpath.relpath(full, self.workspace).split("/")
        current = self.workspace
        for name in [n for n in rest if n not in ("", ".")]:
            current = posixpath.join(current, name)
            try:
                response = self.api.head(self.api._url("/containers/{0}/archive", container), params={"path": current})
            except _ENGINE_ERRORS as exc:
                raise DriverError(f"cannot look up {source!r} in the container: {_explain(exc)}") from None
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise DriverError(f"cannot look up {source!r} in the container: engine answered {response.status_code}")
            stat = _path_stat(response.headers.get("X-Docker-Container-Path-Stat"))
            target = stat.get("linkTarget") or ""
            if target:
                current = posixpath.normpath(target)
                if current != self.workspace and not current.startswith(self.workspace + "/"):
                    raise PathEscapeError(
                        f"artifact source {source!r} leads outside the workspace through a symlink ({target}); not collected"
                    )
        return current

    def _archive(self, container: str, path: str, source: str) -> tuple[Any, dict[str, Any]] | None:
        """The tar stream and stat of `path` in the container, None when it does not exist."""
        assert self.api is not None  # created
        try:
            found: tuple[Any, dict[str, Any]] = self.api.get_archive(container, path)
            return found
        except docker.errors.NotFound:
            return None
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot copy {source!r} out of the container: {_explain(exc)}") from None

    def _collect_glob(self, container: str, pattern: str) -> Iterator[tuple[str, BinaryIO]]:
        """Files matching `pattern` (a `*` in a component matches within it), from one archive of their directory."""
        assert self.api is not None
        parts = pattern.split("/")
        first = next(i for i, p in enumerate(parts) if "*" in p)
        base = "/".join(parts[:first]) or "/"
        resolved = self._resolve(container, base, pattern.removeprefix(self.workspace + "/"))
        if resolved is None:
            return
        try:
            chunks, _ = self.api.get_archive(container, resolved)
        except docker.errors.NotFound:
            return
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot copy {base!r} out of the container: {_explain(exc)}") from None
        # Entries are named from the base directory's own name: rebase them onto its parent.
        parent = posixpath.dirname(base.rstrip("/")) if base != "/" else ""
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), READ_SIZE), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                # Named from the resolved directory's name: put the name the pattern used back.
                name = posixpath.basename(base) + member.name[len(posixpath.basename(resolved)):]
                path = posixpath.normpath(posixpath.join(parent or "/", name))
                if _glob_match(path, parts):
                    stream = tar.extractfile(member)
                    if stream is not None:
                        yield posixpath.relpath(path, self.workspace), cast(BinaryIO, stream)

    # --- cancel and destroy -------------------------------------------------

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            container = self._running
            api = self.api
        if container is not None and api is not None:
            try:
                api.kill(container)
            except _ENGINE_ERRORS:
                pass  # already exited, or the engine is gone: destroy removes it either way

    def _remove_container(self, container: str) -> None:
        assert self.api is not None
        try:
            self.api.remove_container(container, force=True)
        except _GONE:
            pass
        except _ENGINE_ERRORS:
            return  # left for destroy's retry and, failing that, the sweep
        with self._lock:
            if container in self._containers:
                self._containers.remove(container)

    def destroy(self) -> None:
        self.cancel()
        if self._worker is not None:
            # Whatever it is making or removing is done (or dropped) before the rest is removed.
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None
        with self._lock:
            prepared, self._prepared = list(self._prepared.values()), {}
        for _, made in prepared:
            if made.done() and not made.cancelled() and made.exception() is None:
                _close(made.result()[1])  # its container goes with the others below
        if self.api is None:
            return
        errors = []
        for container in list(self._containers):
            self._remove_container(container)
        for volume in list(self._volumes):
            for attempt in range(10):
                try:
                    self.api.remove_volume(volume, force=True)
                except _GONE:
                    pass
                except docker.errors.APIError as exc:
                    # In use for a moment after its last container was removed.
                    if exc.status_code == 409 and attempt < 9:
                        time.sleep(0.05)
                        continue
                    errors.append(f"volume {volume}: {_explain(exc)}")
                except _ENGINE_ERRORS as exc:
                    errors.append(f"volume {volume}: {_explain(exc)}")
                break
            with self._lock:
                self._volumes.remove(volume)
        errors += [f"container {c[:12]} was not removed" for c in self._containers]
        for item in [*self._pending, *self._overlay]:
            item.close()
        self._pending, self._overlay = [], []
        self._last = None
        # Not raised: destroy runs in the runner's cleanup. What is left is logged, kept in
        # `leftovers`, and removed by the worker's start-up sweep (it carries the build's labels).
        self.leftovers = errors
        if errors:
            log.warning("docker build %s: could not remove everything: %s", self.build_id, "; ".join(errors))
        with self._lock:
            api, self.api = self.api, None
        api.close()


def _path_stat(header: str | None) -> dict[str, Any]:
    """The engine's X-Docker-Container-Path-Stat header: base64 of a JSON object."""
    if not header:
        return {}
    try:
        stat: dict[str, Any] = json.loads(base64.b64decode(header))
        return stat
    except (ValueError, TypeError):
        return {}


def _id_and_user(inspected: Mapping[str, Any]) -> tuple[str, str]:
    return inspected["Id"], str((inspected.get("Config") or {}).get("User") or "")


def _glob_match(path: str, parts: list[str]) -> bool:
    """`path` matches the pattern split in `parts`; `*` stays within one component, hidden files need a dot."""
    names = path.split("/")
    if len(names) != len(parts):
        return False
    for name, part in zip(names, parts, strict=True):
        if "*" not in part:
            if name != part:
                return False
        elif (name.startswith(".") and not part.startswith(".")) or not fnmatch.fnmatchcase(name, part):
            return False
    return True


def _stream(sock: Any, output: Output) -> None:
    """Copy an attach stream (8-byte frame headers: stream, 0, 0, 0, big-endian length) to `output`."""
    raw = getattr(sock, "_sock", sock)
    if hasattr(raw, "settimeout"):
        raw.settimeout(None)  # a job may be silent for longer than the client's request timeout
    read = sock.read if hasattr(sock, "read") else sock.recv
    while True:
        header = _read_exact(read, 8)
        if len(header) < 8:
            return
        (size,) = struct.unpack(">4xL", header)
        while size:
            data = read(min(size, READ_SIZE))
            if not data:
                return
            size -= len(data)
            output(data)


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _close(sock: Any) -> None:
    for closable in (getattr(sock, "_sock", None), sock):
        try:
            if closable is not None:
                closable.close()
        except OSError:
            pass


def _close_chunks(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _client(client_or_settings: Any) -> tuple[docker.APIClient, bool]:
    """A low-level client from a client, a high-level client, or docker settings (a map or a block); and whether we own it."""
    if isinstance(client_or_settings, docker.APIClient):
        return client_or_settings, False
    if isinstance(client_or_settings, docker.DockerClient):
        return client_or_settings.api, False
    settings = DockerDriver.settings_of(client_or_settings or {})
    return _api_client(settings.host, settings.version), True


def sweep(
    client_or_settings: Any,
    keep: Callable[[str], bool] | Collection[str] = (),
    worker: str | None = None,
) -> list[str]:
    """Remove containers and volumes of builds that are no longer running; returns what was removed.

    A worker calls it at start-up with the ids of builds still running (`keep`, a set
    or a predicate) and its own name, so leftovers of a crashed worker do not pile up
    and other workers' builds on a shared engine are left alone (worker=None: any worker).
    """
    api, owned = _client(client_or_settings)
    keeping = keep if callable(keep) else (lambda build, ids=frozenset(keep): build in ids)
    wanted = [BUILD_LABEL] + ([f"{WORKER_LABEL}={worker}"] if worker is not None else [])
    removed: list[str] = []
    try:
        for container in api.containers(all=True, filters={"label": wanted}):
            if keeping(container.get("Labels", {}).get(BUILD_LABEL, "")):
                continue
            try:
                api.remove_container(container["Id"], force=True)
            except _GONE:
                continue
            removed.append(f"container {container['Id'][:12]}")
        for volume in api.volumes(filters={"label": wanted}).get("Volumes") or []:
            if keeping((volume.get("Labels") or {}).get(BUILD_LABEL, "")):
                continue
            try:
                api.remove_volume(volume["Name"], force=True)
            except _GONE:
                continue
            removed.append(f"volume {volume['Name']}")
    except _ENGINE_ERRORS as exc:
        raise DriverError(f"cannot sweep leftover build containers: {_explain(exc)}") from None
    finally:
        if owned:
            api.close()
    return removed


DRIVER = DockerDriver
