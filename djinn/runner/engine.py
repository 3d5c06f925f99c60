"""The runner engine: drives one build's plan through a driver (SPEC section 3).

It knows nothing of terminals or databases: what happens is told to a Reporter,
objects come from an ObjectStore and artifacts go to an ArtifactStore. Output is
streamed chunk by chunk; the runner never holds a whole job's output.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterable

from djinn.config.language import format_duration
from djinn.drivers.base import Driver
from djinn.errors import DjinnError
from djinn.paths import plain_file_name
from djinn.plan import BuildPlan, JobPlan
from djinn.runner.control import RunControl, Stop
from djinn.runner.output import Masker, job_script
from djinn.runner.store import ArtifactStore, ObjectStore, StoredArtifact
from djinn.status import Status
from djinn.timers import TIMERS

DEFAULT_TIMEOUT = 30 * 60
CREATE_TIMEOUT = 5 * 60

# Why a build failed, told apart for the operator (the metrics): its own commands,
# the environment it runs in, or the worker itself.
SCRIPT = "script"
DRIVER = "driver"
SYSTEM = "system"


@dataclass(frozen=True)
class Variable:
    key: str
    value: str
    masked: bool = False


@dataclass(frozen=True)
class Key:
    """An SSH private key handed in by the submitter, placed before the first job."""

    name: str
    key: str
    config: str = ""


class Reporter:
    """Told of everything the runner does; subclasses keep what they need."""

    def build_started(self) -> None: ...

    def job_started(self, job: JobPlan) -> None: ...

    def job_output(self, job: JobPlan, data: bytes) -> None: ...

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None: ...

    def artifact_stored(self, job: JobPlan, source: str, artifact: StoredArtifact) -> None: ...

    def build_finished(self, status: Status) -> None: ...


class Reporters(Reporter):
    """Several reporters told of one run, side by side (the build's rows, its metrics).

    Starts go to them in order and ends in reverse, so each sees its own start
    and end nested inside those of the ones before it; every one hears of an end
    even when one before it raised, and the first error is raised after.
    """

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def build_started(self) -> None:
        for reporter in self.reporters:
            reporter.build_started()

    def job_started(self, job: JobPlan) -> None:
        for reporter in self.reporters:
            reporter.job_started(job)

    def job_output(self, job: JobPlan, data: bytes) -> None:
        for reporter in self.reporters:
            reporter.job_output(job, data)

    def artifact_stored(self, job: JobPlan, source: str, artifact: StoredArtifact) -> None:
        for reporter in self.reporters:
            reporter.artifact_stored(job, source, artifact)

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        self._ending(lambda reporter: reporter.job_finished(job, status, ran))

    def build_finished(self, status: Status) -> None:
        self._ending(lambda reporter: reporter.build_finished(status))

    def _ending(self, tell: Callable[[Reporter], None]) -> None:
        error: BaseException | None = None
        for reporter in reversed(self.reporters):
            try:
                tell(reporter)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error


class Runner:
    """Runs one build once; its RunControl (or `cancel`, from any thread) stops it."""

    def __init__(
        self,
        plan: BuildPlan,
        driver: Driver,
        *,
        variables: Iterable[Variable] = (),
        keys: Iterable[Key] = (),
        objects: ObjectStore | None = None,
        artifacts: ArtifactStore | None = None,
        reporter: Reporter | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        create_timeout: float = CREATE_TIMEOUT,
        control: RunControl | None = None,
    ) -> None:
        self.plan = plan
        self.driver = driver
        self.variables = [v for v in variables]
        self.keys = list(keys)
        self.objects = objects
        self.artifacts = artifacts
        self.reporter = reporter or Reporter()
        self.timeout = timeout
        self.create_timeout = create_timeout
        #: An unexpected exception met while running (a bug, not a failed build), for the caller to report.
        self.error: BaseException | None = None
        #: SCRIPT, DRIVER or SYSTEM: what made the build `failed`; None while nothing did.
        self.failure: str | None = None
        self._secrets = [v.value for v in self.variables if v.masked] + [k.key for k in self.keys]
        self.control = control or RunControl()
        self.control.on_stop(driver.cancel)
        self._create_expired = False

    @property
    def env(self) -> dict[str, str]:
        return {v.key: v.value for v in self.variables}

    def cancel(self, status: Status = Status.KILLED) -> None:
        """Stop the build: the running job and the build end with `status` (killed or timed_out)."""
        self.control.stop(Stop.TIMED_OUT if status is Status.TIMED_OUT else Stop.KILLED)

    def run(self) -> Status:
        jobs = [(job, stage.can_fail) for stage in self.plan.stages for job in stage.jobs]
        results: list[Status] = []
        self.reporter.build_started()
        timer = TIMERS.call_later(self.timeout, lambda: self.control.stop(Stop.TIMED_OUT), blocking=True)
        try:
            results.append(self._create(jobs[0][0]))
            for i, (job, can_fail) in enumerate(jobs[1:], 1):
                if max(results) >= Status.FAILED or self.control.stopped:
                    break
                if i + 1 < len(jobs):
                    self._prepare(jobs[i + 1][0])  # the next job, readied while this one runs
                results.append(self._run_job(job, can_fail))
        finally:
            timer.cancel()
            self._destroy()
        final = max([*results, self.control.status or Status.PASSED])
        for job, _ in jobs[len(results):]:
            self.reporter.job_finished(job, final, ran=False)
        self.reporter.build_finished(final)
        return final

    def _prepare(self, job: JobPlan) -> None:
        try:
            self.driver.prepare(job.name, job_script(job.commands))
        except Exception as exc:  # a hint that failed is a bug in the driver, not the build's failure
            self.error = self.error or exc

    def _destroy(self) -> None:
        try:
            self.driver.destroy()
        except Exception as exc:  # the build's outcome stands; what is left is the caller's to report
            self.error = self.error or exc

    def _create(self, job: JobPlan) -> Status:
        """The create-driver job: bring the driver up, then place objects and keys."""
        self.reporter.job_started(job)
        masker = Masker(self._secrets)
        write = self._writer(job, masker)

        def expire() -> None:
            self._create_expired = True
            self.driver.cancel()

        timer = TIMERS.call_later(self.create_timeout, expire, blocking=True)
        status = Status.PASSED
        cause = DRIVER
        try:
            self.driver.create(self.env, write)
            if not self.control.stopped:
                self._place(write)
        except DjinnError as exc:
            write(f"djinn: {exc}\n".encode())
            status = Status.FAILED
        except Exception as exc:  # a bug: fail the build and let the caller report it
            self.error = exc
            write(f"djinn: internal error creating the driver: {exc!r}\n".encode())
            status, cause = Status.FAILED, SYSTEM
        finally:
            timer.cancel()
        if self._create_expired and not self.control.stopped:
            write(f"djinn: driver creation did not finish within {format_duration(self.create_timeout)}\n".encode())
            status = Status.FAILED
        status = max(status, self.control.status or Status.PASSED)
        if status is Status.FAILED:
            self.failure = self.failure or cause
        self._finish_output(job, masker)
        self.reporter.job_finished(job, status, ran=True)
        return status

    def _place(self, write: Callable[[bytes], None]) -> None:
        for obj in self.plan.objects:
            if self.objects is None:
                raise DjinnError(f"object {obj.source!r} cannot be placed: no object store is configured")
            with self.objects.open(obj.source) as data:
                self.driver.place(obj.destination, data)
            write(f"Placed object {obj.source} => {obj.destination}\n".encode())
        configs = []
        for key in self.keys:
            # Keys land in the key directory by name: '../../x' must not place one anywhere else.
            location = self.driver.key_location(plain_file_name(key.name, "key name"))
            self.driver.place(location, io.BytesIO(key.key.encode()), 0o600)
            if key.config:
                configs.append(key.config.rstrip("\n") + "\n")
            write(f"Placed key {key.name} => {location}\n".encode())
        if configs:
            location = self.driver.key_location("config")
            self.driver.place(location, io.BytesIO("".join(configs).encode()), 0o600)

    def _run_job(self, job: JobPlan, can_fail: bool) -> Status:
        self.reporter.job_started(job)
        masker = Masker(self._secrets)
        write = self._writer(job, masker)
        cause = SCRIPT
        try:
            code = self.driver.execute(job.name, job_script(job.commands), write)
        except DjinnError as exc:
            write(f"\ndjinn: {exc}\n".encode())
            code, cause = -1, DRIVER
        except Exception as exc:  # a bug: fail the job and let the caller report it
            self.error = exc
            write(f"\ndjinn: internal error running the job: {exc!r}\n".encode())
            code, cause = -1, SYSTEM
        interrupted = self.control.status
        if interrupted is not None:
            status = interrupted
        elif code == 0:
            status = Status.PASSED
        else:
            status = Status.PASSED_WITH_FAILURES if can_fail else Status.FAILED
        if status is Status.FAILED:
            self.failure = self.failure or cause
        if not self.control.stopped:
            self._collect(job, write)
        self._finish_output(job, masker)
        self.reporter.job_finished(job, status, ran=True)
        return status

    def _collect(self, job: JobPlan, write: Callable[[bytes], None]) -> None:
        for artifact in job.artifacts:
            found = False
            try:
                for path, data in self.driver.collect(artifact.source):
                    found = True
                    name = artifact.destination
                    if "*" in name:
                        name = name.replace("*", path.rsplit("/", 1)[-1])
                    if self.artifacts is None:
                        continue
                    stored = self.artifacts.store(job, name, data)
                    self.reporter.artifact_stored(job, path, stored)
                    note = " (truncated to the store's limit)" if stored.truncated else ""
                    write(f"Collected artifact {path} => {name}{note}\n".encode())
            except DjinnError as exc:
                write(f"djinn: artifact {artifact.source}: {exc}\n".encode())
                continue
            if not found:
                write(f"djinn: artifact {artifact.source}: not found\n".encode())

    def _writer(self, job: JobPlan, masker: Masker) -> Callable[[bytes], None]:
        report = self.reporter.job_output

        def write(data: bytes) -> None:
            filtered = masker.feed(data)
            if filtered:
                report(job, filtered)

        return write

    def _finish_output(self, job: JobPlan, masker: Masker) -> None:
        tail = masker.flush()
        if tail:
            self.reporter.job_output(job, tail)

