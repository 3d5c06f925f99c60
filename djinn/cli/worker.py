"""`djinn-worker`: the build worker daemon and its operator commands.

    djinn-worker [-config FILE] [-driver FILE] [-check]    run the worker (or validate the config)
    djinn-worker migrate -config FILE                       create or upgrade the schema
    djinn-worker submit -config FILE MANIFEST [-user NAME] [-env K=V ...] [-json]
    djinn-worker status -config FILE ID [-json]
    djinn-worker logs -config FILE ID [-f]
    djinn-worker kill -config FILE ID
    djinn-worker -version

Flags go before or after the command, as Go users type them
(`djinn-worker -config F migrate` is `djinn-worker migrate -config F`).
Exit status: 0 done, 1 a service is unreachable (or the command failed),
2 invalid input.
"""

from __future__ import annotations

# Function-local imports: each subcommand imports what it uses when it runs, so -help,
# -version and -check answer without loading Celery, SQLAlchemy or a driver's client library.
import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from djinn.cli import (
    EXIT_FAILED,
    EXIT_INVALID,
    ArgumentParser,
    InputError,
    Unreachable,
    add_variable_flags,
    add_version_flag,
    check_text,
    fail,
    read_text_file,
    variable_pairs,
    warn,
)
from djinn.config import DriverConfig, WorkerConfig, driver_kind, load_driver_config, load_worker_config
from djinn.errors import ConfigError, DjinnError

if TYPE_CHECKING:  # for annotations only: the subcommands import these when they run
    from sqlalchemy.orm import Session

    from djinn.db.models import Build
    from djinn.worker.context import WorkerContext

PROG = "djinn-worker"
# Lengths of the users columns the submitted owner is written to (djinn.db.models.User).
MAX_USERNAME = 64
MAX_EMAIL = 255


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Take Djinn CI builds off the Redis queue of the configured driver and run them. "
        "Operator commands: migrate, submit, status, logs, kill (see `djinn-worker COMMAND --help`).",
    )
    _config_flag(parser)
    parser.add_argument("-driver", "--driver", default="djinn-driver.conf", metavar="FILE", help="driver config (default djinn-driver.conf)")
    parser.add_argument(
        "-check",
        "--check",
        action="store_true",
        help="validate both files, print the effective settings as JSON and exit",
    )
    return parser


def _config_flag(parser: ArgumentParser) -> None:
    """The flags every djinn-worker command takes."""
    parser.add_argument("-config", "--config", default="djinn-worker.conf", metavar="FILE", help="worker config (default djinn-worker.conf)")
    add_version_flag(parser, PROG)


def load_configs(config_path: str, driver_path: str) -> tuple[WorkerConfig, DriverConfig]:
    """Both config files, with every error raised as ConfigError naming file and line."""
    worker = load_worker_config(config_path)
    drivers = load_driver_config(driver_path)
    kind = driver_kind(worker.driver)
    if kind != "os" and kind not in drivers.configured:
        raise ConfigError(f"{driver_path}: the worker's driver is {worker.driver!r} but this file has no 'driver {kind}' block")
    return worker, drivers


def effective_settings(worker: WorkerConfig, drivers: DriverConfig) -> dict[str, Any]:
    """What `-check` prints: the resolved settings, never a password, key or salt."""
    return {**worker.public_dict(), "drivers": drivers.public_dict()}


# -- the daemon ---------------------------------------------------------------


def run_daemon(config_path: str, driver_path: str, worker: WorkerConfig, drivers: DriverConfig) -> int:
    """Run the Celery worker in this process until it is stopped.

    Stopping (djinn.worker.shutdown): the first SIGTERM or SIGINT drains (no new builds,
    running ones finish, exit 0), a second one hands the running builds back to
    be rerun by other workers. SIGHUP reopens the log file.
    """
    import redis

    from djinn.db.engine import check_connection, make_engine
    from djinn.drivers import driver_class
    from djinn.observe import logs, metrics
    from djinn.worker import shutdown
    from djinn.worker.health import HealthChecker
    from djinn.worker.kill import redis_client
    from djinn.worker.queue import CONFIG_ENV, DRIVER_CONFIG_ENV, make_app

    check_connection(make_engine(worker.database, pool_size=1))
    try:
        redis_client(worker.redis, socket_connect_timeout=5, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise DjinnError(f"cannot connect to Redis at {worker.redis.addr}: {exc}") from None
    kind = driver_kind(worker.driver)
    driver_class(kind).check(drivers.settings_for(kind))

    # Pool processes and `celery -A djinn` read the same files through these.
    os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
    os.environ[DRIVER_CONFIG_ENV] = str(Path(driver_path).resolve())
    try:
        logs.setup(worker.log.level, worker.log.file)
    except OSError as exc:
        raise DjinnError(f"log file {worker.log.file}: {exc.strerror}") from None
    # Listening before the pool forks: a taken port stops the start, and every pool
    # process inherits the socket its metric events go to.
    metrics.start(worker, HealthChecker(worker).check, shutdown.phase)
    if worker.pidfile:
        try:
            Path(worker.pidfile).parent.mkdir(parents=True, exist_ok=True)
            Path(worker.pidfile).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            metrics.stop()
            raise DjinnError(f"pidfile {worker.pidfile}: {exc.strerror}") from None
    argv = [
        "worker",
        "--queues",
        worker.queue,
        "--concurrency",
        str(worker.resolved_parallelism),
        "--loglevel",
        {"warn": "WARNING"}.get(worker.log.level, worker.log.level.upper()),
        "--hostname",
        f"djinn-{worker.driver}@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    if worker.log.file:
        argv += ["--logfile", worker.log.file]
    try:
        make_app(worker).worker_main(argv)
    finally:
        metrics.stop()
        if worker.pidfile:
            Path(worker.pidfile).unlink(missing_ok=True)
    return 0


# -- operator commands --------------------------------------------------------

# The config of the running command, so an unreachable service can be named by its address.
_in_use: WorkerConfig | None = None


def _context(config_path: str) -> WorkerContext:
    """The command's WorkerContext, PostgreSQL checked first so that a database that is down is exit 1."""
    global _in_use
    from djinn.db.engine import check_connection
    from djinn.worker.context import WorkerContext

    config = load_worker_config(config_path)
    warn(PROG, config.warnings)
    _in_use = config
    ctx = WorkerContext(config, DriverConfig.defaults())
    check_connection(ctx.engine)
    return ctx


def _check_redis(config: WorkerConfig) -> None:
    import redis

    from djinn.worker.kill import redis_client

    try:
        redis_client(config.redis, socket_connect_timeout=5, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise Unreachable(f"cannot connect to Redis at {config.redis.addr}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cmd_migrate(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog=f"{PROG} migrate", description="Create or upgrade the database schema (idempotent).")
    _config_flag(parser)
    args = parser.parse_args(argv)
    from djinn.db.migrate import upgrade

    ctx = _context(args.config)
    before, after = upgrade(ctx.engine)
    if before == after:
        print(f"schema is up to date (revision {after})")
    else:
        print(f"schema upgraded from {before or 'nothing'} to {after}")
    return 0


def _key_files(values: Sequence[str]) -> list[tuple[str, str]]:
    """`-key NAME=FILE` pairs; NAME becomes /root/.ssh/NAME, so it must be a plain file name."""
    out = []
    for name, path in variable_pairs(values, "-key", from_environment=False, form="NAME=FILE"):
        if not path:
            raise InputError(f"-key {name}=: expected NAME=FILE")
        if "/" in name or name in (".", "..") or len(name.encode()) > 255:
            raise InputError(f"-key {name!r}: the key name must be a plain file name (it is written to /root/.ssh/NAME)")
        out.append((name, path))
    return out


def cmd_submit(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog=f"{PROG} submit",
        description="Validate a manifest, store the build and queue it on its driver's queue. Prints the build id.",
    )
    _config_flag(parser)
    parser.add_argument("manifest", metavar="MANIFEST", help="the build manifest file")
    parser.add_argument("-user", "--user", default="djinn", metavar="NAME", help="the build's owner (created if new; default djinn)")
    parser.add_argument("-email", "--email", default=None, metavar="ADDR", help="the owner's mail address, for failure mail")
    add_variable_flags(parser)
    parser.add_argument("-key", "--key", action="append", default=[], metavar="NAME=FILE", help="an SSH key placed at /root/.ssh/NAME (repeatable)")
    parser.add_argument("-comment", "--comment", default="", help="the trigger's description (shown in mail)")
    parser.add_argument("-json", "--json", action="store_true", help='print {"id", "number", "queue"}')
    args = parser.parse_args(argv)

    import sqlalchemy.exc

    from djinn.db.submit import SubmitError, Trigger, submit
    from djinn.runner.engine import Key, Variable
    from djinn.worker.queue import enqueue

    text = read_text_file(args.manifest, "")
    check_text(args.user, "-user")
    if not args.user or len(args.user) > MAX_USERNAME:
        raise InputError(f"-user must be 1 to {MAX_USERNAME} characters")
    if args.email is not None and len(check_text(args.email, "-email")) > MAX_EMAIL:
        raise InputError(f"-email must be at most {MAX_EMAIL} characters")
    check_text(args.comment, "-comment")
    variables = [Variable(k, v) for k, v in variable_pairs(args.env, "-env", from_environment=False)]
    variables += [Variable(k, v, True) for k, v in variable_pairs(args.secret, "-secret", from_environment=True)]
    keys = [Key(name, read_text_file(path, f"-key {name}: ")) for name, path in _key_files(args.key)]
    ctx = _context(args.config)
    _check_redis(ctx.config)
    broker_failures: list[BaseException] = []

    def queue_build(build_id: int, queue: str) -> None:
        try:
            enqueue(ctx.app, build_id, queue)
        except Exception as exc:
            broker_failures.append(exc)
            raise

    try:
        submitted = submit(
            ctx.sessions,
            text,
            username=args.user,
            email=args.email,
            variables=variables,
            keys=keys,
            cipher=ctx.cipher,
            trigger=Trigger(comment=args.comment),
            enqueue=queue_build,
            manifest_path=args.manifest,
        )
    except SubmitError:
        if broker_failures:
            raise Unreachable(f"cannot queue the build: Redis at {ctx.config.redis.addr}: {_first_line(broker_failures[0])}") from None
        raise
    except UnicodeEncodeError:
        raise InputError(f"{args.manifest}: contains text that is not valid UTF-8 (such as a \\ud800 escape)") from None
    except sqlalchemy.exc.DataError as exc:
        raise InputError(f"{args.manifest}: a value does not fit its database column: {_first_line(exc)}") from None
    warn(PROG, submitted.warnings)
    if args.json:
        print(json.dumps({"id": submitted.id, "number": submitted.number, "queue": submitted.queue}))
    else:
        print(submitted.id)
    return 0


def _build_id_parser(name: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} {name}", description=description)
    _config_flag(parser)
    parser.add_argument("id", metavar="ID", type=_build_id, help="the build id")
    return parser


def _build_id(text: str) -> int:
    """A build id as the builds.id column can hold it (BIGINT, from 1)."""
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not 0 < int(text) < 1 << 63:
        raise argparse.ArgumentTypeError(f"invalid build id {text[:40]!r}: expected a number from 1")
    return int(text)


def _get_build(session: Session, build_id: int) -> Build:
    from djinn.db.models import Build

    build = session.get(Build, build_id)
    if build is None:
        raise InputError(f"no build with id {build_id}")
    return build


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def cmd_status(argv: Sequence[str]) -> int:
    parser = _build_id_parser("status", "Show a build's status, its jobs and artifacts.")
    parser.add_argument("-json", "--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    ctx = _context(args.config)
    with ctx.sessions() as session:
        build = _get_build(session, args.id)
        stage_names = {s.id: s.name for s in build.stages}
        info: dict[str, Any] = {
            "id": build.id,
            "number": build.number,
            "status": build.status,
            "started_at": _iso(build.started_at),
            "finished_at": _iso(build.finished_at),
            "tags": [t.name for t in build.tags],
            "jobs": [
                {
                    "stage": stage_names[j.stage_id],
                    "name": j.name,
                    "status": j.status,
                    "started_at": _iso(j.started_at),
                    "finished_at": _iso(j.finished_at),
                }
                for j in build.jobs
            ],
            "artifacts": [
                {"name": a.name, "size": a.size, "sha256": a.sha256.hex() if a.sha256 else None} for a in build.artifacts
            ],
        }
        error = build.error
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"build #{info['number']} (id {info['id']}): {info['status']}")
    print(f"  started {info['started_at'] or '-'}, finished {info['finished_at'] or '-'}")
    if info["tags"]:
        print(f"  tags: {', '.join(info['tags'])}")
    if error:
        print(f"  error: {error}")
    for job in info["jobs"]:
        print(f"  {job['stage']:<24} {job['name']:<24} {job['status']}")
    for artifact in info["artifacts"]:
        print(f"  artifact {artifact['name']} ({artifact['size'] if artifact['size'] is not None else 'not collected'} bytes)")
    return 0


def cmd_logs(argv: Sequence[str]) -> int:
    parser = _build_id_parser("logs", "Print a build's output.")
    parser.add_argument("-f", "--follow", action="store_true", help="follow a running build's output until it finishes")
    args = parser.parse_args(argv)
    from djinn.db.recorder import stream_output

    ctx = _context(args.config)
    out = sys.stdout
    for text in stream_output(ctx.sessions, args.id, follow=args.follow):
        out.write(text)
        out.flush()  # a reader that went away (logs -f | head) ends here: see main()
    return 0


def cmd_kill(argv: Sequence[str]) -> int:
    parser = _build_id_parser(
        "kill", "Kill a build: a queued one is marked killed at once, a running one gets its secret on the kill-<ID> Redis channel."
    )
    args = parser.parse_args(argv)
    from djinn import notify
    from djinn.db.engine import transaction
    from djinn.status import Status
    from djinn.worker.kill import publish_kill, settle_queued_kill

    ctx = _context(args.config)
    with transaction(ctx.sessions) as session:
        build = _get_build(session, args.id)
        secret, status = build.secret, build.status
        settled = status == "queued" and settle_queued_kill(session, args.id)
        if settled:
            notify.record_build_finished(ctx, session, args.id)  # its commit status and webhooks
    if settled:
        if ctx.config.smtp is not None:
            # Its failure mail, queued now; the workers' mail sweep covers a broker outage, and
            # without an smtp block here it owes the mail itself (djinn.notify.sweep).
            notify.on_build_failed(ctx, args.id, Status.KILLED)
        print(f"build {args.id} was queued: marked killed, it will not run")
        return 0
    if status not in ("queued", "running"):
        raise DjinnError(f"build {args.id} is already {status}")
    listeners = publish_kill(ctx.config.redis, args.id, secret or "")
    # `listeners` counts Redis subscribers: a running build's worker is one of them.
    if listeners:
        print(f"kill sent to build {args.id}")
    else:
        print(f"kill sent to build {args.id}, but no worker is running build {args.id}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "migrate": cmd_migrate,
    "submit": cmd_submit,
    "status": cmd_status,
    "logs": cmd_logs,
    "kill": cmd_kill,
}


# Flags that take a value, in any command: skipped when looking for the command's name.
_VALUE_FLAGS = {
    f"{dashes}{name}"
    for name in ("config", "driver", "user", "email", "env", "secret", "key", "comment")
    for dashes in ("-", "--")
}


def split_command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The command named anywhere among the flags, and the other arguments in their order.

    `-config F migrate` and `migrate -config F` give ("migrate", ["-config", "F"]).
    A value of a flag (`-config migrate`) is not a command; neither is anything after
    the first positional argument that precedes a command.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in COMMANDS:
            return arg, [*argv[:i], *argv[i + 1 :]]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        i += 2 if arg in _VALUE_FLAGS else 1
    return None, list(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, rest = split_command(argv)
        if command is not None:
            return COMMANDS[command](rest)
        args = build_parser().parse_args(argv)
        worker, drivers = load_configs(args.config, args.driver)
        warn(PROG, (*worker.warnings, *drivers.warnings))
        if args.check:
            json.dump(effective_settings(worker, drivers), sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            sys.stdout.flush()
            return 0
        return run_daemon(args.config, args.driver, worker, drivers)
    except BrokenPipeError:
        # The reader went away (`logs -f | head`): stop quietly, and keep the
        # interpreter's final flush from complaining about the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except DjinnError as exc:
        return fail(PROG, exc, EXIT_INVALID if isinstance(exc, ConfigError) or _is_input_error(exc) else EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        unreachable = _unreachable(exc)
        if unreachable is None:
            raise
        return fail(PROG, unreachable, EXIT_FAILED)


def _unreachable(exc: BaseException) -> str | None:
    """One line naming the service when `exc` says PostgreSQL or Redis cannot be reached."""
    import kombu.exceptions
    import redis
    import sqlalchemy.exc

    config = _in_use
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        where = f" at {config.database.addr}" if config else ""
        return f"cannot connect to PostgreSQL{where}: {_first_line(exc)}"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)):
        where = f" at {config.redis.addr}" if config else ""
        return f"cannot connect to Redis{where}: {_first_line(exc)}"
    return None


def _is_input_error(exc: DjinnError) -> bool:
    from djinn.db.submit import SubmitError
    from djinn.errors import ManifestError

    return isinstance(exc, (InputError, ManifestError, SubmitError))


if __name__ == "__main__":
    sys.exit(main())
