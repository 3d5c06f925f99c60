"""`djinn-worker`: the build worker daemon and its operator commands."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from djinn.cli import EXIT_INVALID, ArgumentParser, fail
from djinn.config import DriverConfig, WorkerConfig, load_driver_config, load_worker_config
from djinn.errors import ConfigError, DjinnError

PROG = "djinn-worker"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Take Djinn CI builds off the Redis queue of the configured driver and run them.",
    )
    parser.add_argument("-config", "--config", default="djinn-worker.conf", metavar="FILE", help="worker config (default djinn-worker.conf)")
    parser.add_argument("-driver", "--driver", default="djinn-driver.conf", metavar="FILE", help="driver config (default djinn-driver.conf)")
    parser.add_argument(
        "-check",
        "--check",
        action="store_true",
        help="validate both files, print the effective settings as JSON and exit",
    )
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        worker, drivers = load_configs(args.config, args.driver)
    except DjinnError as exc:
        return fail(PROG, exc, EXIT_INVALID)
    if args.check:
        json.dump(effective_settings(worker, drivers), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    return fail(PROG, "running the worker daemon is not implemented yet; use -check to validate the config", EXIT_INVALID)


if __name__ == "__main__":
    sys.exit(main())
