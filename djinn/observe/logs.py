"""The worker's log: one structured line per record, reopened on SIGHUP for logrotate.

Every line is logfmt (`key=value`, values with spaces quoted) so it can be
read by people and parsed by log shippers alike:

    time=2025-01-02T03:04:05.678Z level=info build=12 job=test.1 process=ForkPoolWorker-1 logger=djinn.worker.execute msg="claimed (attempt 1)"

`build` and `job` are there while a build runs: a Celery pool process runs one
build at a time, so the build a process is running names the build of every
line it writes, from any of its threads (heartbeat, kill listener, output).
A traceback goes on the same line, in `exc`, with newlines escaped.

The file is reopened, never rotated, by the worker: logrotate moves it away and
sends SIGHUP to the main process, which reopens it; pool processes notice the
move on their next line and reopen it too.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from logging.handlers import WatchedFileHandler
from typing import Iterator

from djinn.runner import control

#: Celery's own line per task ("received", "succeeded in"): below debug they are left out, as
#: the worker writes its own per build (claimed, and how it ended), naming the build.
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}

_local = threading.local()


@contextmanager
def build_context(build_id: int) -> Iterator[None]:
    """Lines this thread logs while the block runs carry `build=<build_id>` (and the run's job)."""
    previous = getattr(_local, "build", None)
    _local.build = build_id
    try:
        yield
    finally:
        _local.build = previous


def set_job(build_id: int, job: str | None) -> None:
    """The job of `build_id` that runs now (None between jobs)."""
    run = control.find(build_id)
    if run is not None:
        run.job = job


def current() -> tuple[int | None, str | None]:
    """The build and job a line logged by this thread belongs to, as far as is known.

    Other threads of a run (heartbeat, kill listener) log for the one build this
    process runs, when it runs just one.
    """
    build = getattr(_local, "build", None)
    run = control.sole() if build is None else control.find(build)
    if build is None and run is not None:
        build = run.build_id
    return build, run.job if run is not None else None


class ContextFilter(logging.Filter):
    """Adds `build` and `job` to every record (an explicit `extra={"build": ...}` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "build", None) is None:
            record.build, record.job = current()
        elif not hasattr(record, "job"):
            record.job = None
        return True


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\r\t') and value.isprintable():
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """time, level, build, job, process, logger, msg (and exc): one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = [("time", ts), ("level", record.levelname.lower())]
        build = getattr(record, "build", None)
        job = getattr(record, "job", None)
        if build is not None:
            fields.append(("build", str(build)))
        if job:
            fields.append(("job", str(job)))
        fields += [("process", record.processName or str(record.process)), ("logger", record.name)]
        fields.append(("msg", record.getMessage()))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields.append(("exc", record.exc_text))
        if record.stack_info:
            fields.append(("stack", self.formatStack(record.stack_info)))
        return " ".join(f"{key}={_quote(value)}" for key, value in fields)


class ReopeningFileHandler(WatchedFileHandler):
    """A file handler that `reopen()` (SIGHUP) points at whatever file is at its path now.

    It also notices by itself when the file was moved away (a stat per line), which
    is how pool processes follow logrotate: only the main process gets the SIGHUP.
    """

    def __init__(self, filename: str) -> None:
        super().__init__(filename, mode="a", encoding="utf-8", delay=False)

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                try:
                    self.stream.flush()
                    self.stream.close()
                except OSError:
                    pass
            self.stream = None
            self.stream = self._open()
            self._statstream()
        finally:
            self.release()


def setup(level: str, file: str | None) -> logging.Handler:
    """Send every logger's records to `file` (standard error when None) at `level`. Idempotent per process."""
    root = logging.getLogger()
    for existing in root.handlers:
        if getattr(existing, "_djinn", False):  # set up already (a pool process inherits it)
            return existing
    if file:
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        handler: logging.Handler = ReopeningFileHandler(file)
    else:
        handler = logging.StreamHandler()
    handler._djinn = True  # type: ignore[attr-defined]
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(ContextFilter())
    numeric = LEVELS.get(level.lower(), logging.INFO) if isinstance(level, str) else int(level)
    handler.setLevel(numeric)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in PER_TASK_LOGGERS:  # their warnings and errors (a task that raised) still show
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    return handler


#: The signal that has a worker process write every thread's stack to its standard error.
STACKS_SIGNAL = signal.SIGUSR2


def dump_stacks_on_signal() -> None:
    """A stuck build can be looked into without stopping it: `kill -USR2` each process of the worker.

    faulthandler writes from its C signal handler, so it answers even while
    the process's Python threads hold every lock there is.
    """
    faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def reopen() -> None:
    """Reopen the worker's log file in this process (after logrotate moved it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            handler.reopen()
