"""`djinn-worker`: the build worker daemon and its operator commands.

    djinn-worker [-config FILE] [-driver FILE] [-check]    run the worker (or validate the config)
    djinn-worker migrate -config FILE                       create or upgrade the schema
    djinn-worker submit -config FILE MANIFEST [-user NAME] [-env K=V ...] [-json]
    djinn-worker status -config FILE ID [-json]
    djinn-worker logs -config FILE ID [-f]
    djinn-worker kill -config FILE ID
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from djinn.cli import EXIT_INVALID, ArgumentParser, fail
from djinn.config import DriverConfig, WorkerConfig, load_driver_config, load_worker_config
from djinn.errors import ConfigError, DjinnError

PROG = "djinn-worker"
EXIT_FAILED = 1


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
    parser.add_argument("-config", "--config", default="djinn-worker.conf", metavar="FILE", help="worker config (default djinn-worker.conf)")


def load_configs(config_path: str, driver_path: str) -> tuple[WorkerConfig, DriverConfig]:
    """Both config files, with every error raised as ConfigError naming file and line."""
    worker = load_worker_config(config_path)
    drivers = load_driver_config(driver_path)
    kind = "qemu" if worker.driver == "qemu-x86_64" else worker.driver
    if kind != "os" and kind not in drivers.configured:
        raise ConfigError(f"{driver_path}: the worker's driver is {worker.driver!r} but this file has no 'driver {kind}' block")
    return worker, drivers


def effective_settings(worker: WorkerConfig, drivers: DriverConfig) -> dict:
    """What `-check` prints: the resolved settings, never a password, key or salt."""
    return {**worker.public_dict(), "drivers": drivers.public_dict()}


# -- the daemon ---------------------------------------------------------------


def run_daemon(config_path: str, driver_path: str, worker: WorkerConfig, drivers: DriverConfig) -> int:
    """Run the Celery worker in this process until it is stopped.

    Stopping (djinn.shutdown): the first SIGTERM or SIGINT drains (no new builds,
    running ones finish, exit 0), a second one hands the running builds back to
    be rerun by other workers. SIGHUP reopens the log file.
    """
    from djinn import logs, metrics
    from djinn.db import check_connection, make_engine
    from djinn.drivers import driver_class
    from djinn.kill import redis_client
    from djinn.queue import CONFIG_ENV, DRIVER_CONFIG_ENV, make_app

    import redis

    check_connection(make_engine(worker.database, pool_size=1))
    try:
        redis_client(worker.redis, socket_connect_timeout=5, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise DjinnError(f"cannot connect to Redis at {worker.redis.addr}: {exc}") from None
    kind = "qemu" if worker.driver == "qemu-x86_64" else worker.driver
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
    metrics.start(worker)
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


def _context(config_path: str):
    from djinn.context import WorkerContext

    return WorkerContext(load_worker_config(config_path), DriverConfig.defaults())


def cmd_migrate(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog=f"{PROG} migrate", description="Create or upgrade the database schema (idempotent).")
    _config_flag(parser)
    args = parser.parse_args(argv)
    from djinn.db import check_connection
    from djinn.migrate import upgrade

    ctx = _context(args.config)
    check_connection(ctx.engine)
    before, after = upgrade(ctx.engine)
    if before == after:
        print(f"schema is up to date (revision {after})")
    else:
        print(f"schema upgraded from {before or 'nothing'} to {after}")
    return 0


def _pairs(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        key, eq, val = value.partition("=")
        if not eq or not key:
            raise DjinnError(f"{flag} {value!r}: expected KEY=VALUE")
        out.append((key, val))
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
    parser.add_argument("-env", "--env", action="append", default=[], metavar="K=V", help="a build variable (repeatable)")
    parser.add_argument("-secret", "--secret", action="append", default=[], metavar="K=V", help="a masked build variable (repeatable)")
    parser.add_argument("-key", "--key", action="append", default=[], metavar="NAME=FILE", help="an SSH key placed at /root/.ssh/NAME (repeatable)")
    parser.add_argument("-comment", "--comment", default="", help="the trigger's description (shown in mail)")
    parser.add_argument("-json", "--json", action="store_true", help='print {"id", "number", "queue"}')
    args = parser.parse_args(argv)

    from djinn.queue import enqueue
    from djinn.runner import Key, Variable
    from djinn.submit import Trigger, submit

    try:
        text = Path(args.manifest).read_text()
    except OSError as exc:
        raise DjinnError(f"{args.manifest}: {exc.strerror}") from None
    variables = [Variable(k, v) for k, v in _pairs(args.env, "-env")]
    variables += [Variable(k, v, True) for k, v in _pairs(args.secret, "-secret")]
    keys = []
    for name, path in _pairs(args.key, "-key"):
        try:
            keys.append(Key(name, Path(path).read_text()))
        except OSError as exc:
            raise DjinnError(f"-key {name}: {path}: {exc.strerror}") from None
    ctx = _context(args.config)
    submitted = submit(
        ctx.sessions,
        text,
        username=args.user,
        email=args.email,
        variables=variables,
        keys=keys,
        cipher=ctx.cipher,
        trigger=Trigger(comment=args.comment),
        enqueue=lambda build_id, queue: enqueue(ctx.app, build_id, queue),
        manifest_path=args.manifest,
    )
    if args.json:
        print(json.dumps({"id": submitted.id, "number": submitted.number, "queue": submitted.queue}))
    else:
        print(submitted.id)
    return 0


def _build_id_parser(name: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} {name}", description=description)
    _config_flag(parser)
    parser.add_argument("id", metavar="ID", type=int, help="the build id")
    return parser


def _get_build(session, build_id: int):
    from djinn.models import Build

    build = session.get(Build, build_id)
    if build is None:
        raise DjinnError(f"no build with id {build_id}")
    return build


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def cmd_status(argv: Sequence[str]) -> int:
    parser = _build_id_parser("status", "Show a build's status, its jobs and artifacts.")
    parser.add_argument("-json", "--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    ctx = _context(args.config)
    with ctx.sessions() as session:
        build = _get_build(session, args.id)
        stage_names = {s.id: s.name for s in build.stages}
        info = {
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
    from djinn.recorder import stream_output

    ctx = _context(args.config)
    out = sys.stdout
    for text in stream_output(ctx.sessions, args.id, follow=args.follow):
        out.write(text)
        out.flush()
    return 0


def cmd_kill(argv: Sequence[str]) -> int:
    parser = _build_id_parser(
        "kill", "Kill a build: a queued one is marked killed at once, a running one gets its secret on the kill-<ID> Redis channel."
    )
    args = parser.parse_args(argv)
    from djinn import notify
    from djinn.db import transaction
    from djinn.kill import publish_kill, settle_queued_kill
    from djinn.status import Status

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
    print(f"kill sent to build {args.id} ({listeners} worker{'s' if listeners != 1 else ''} listening)")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "migrate": cmd_migrate,
    "submit": cmd_submit,
    "status": cmd_status,
    "logs": cmd_logs,
    "kill": cmd_kill,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        worker, drivers = load_configs(args.config, args.driver)
        if args.check:
            json.dump(effective_settings(worker, drivers), sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        return run_daemon(args.config, args.driver, worker, drivers)
    except DjinnError as exc:
        return fail(PROG, exc, EXIT_INVALID if isinstance(exc, ConfigError) or _is_input_error(exc) else EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


def _is_input_error(exc: DjinnError) -> bool:
    from djinn.errors import ManifestError
    from djinn.submit import SubmitError

    return isinstance(exc, (ManifestError, SubmitError))


if __name__ == "__main__":
    sys.exit(main())
