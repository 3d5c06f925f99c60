"""`djinn`: the offline runner. Runs one manifest on this machine, no Redis or PostgreSQL needed.

The driver config is `-driver FILE`, else `djinn-driver.conf` in the working
directory, else upstream's default `$XDG_CONFIG_HOME/djinn/driver.conf`
(`~/.config/djinn/driver.conf`), else built-in defaults.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import BinaryIO, Sequence

from djinn.cli import EXIT_INVALID, ArgumentParser, add_variable_flags, add_version_flag, fail, variable_pairs, warn
from djinn.config import DriverConfig, load_driver_config
from djinn.config.language import parse_duration
from djinn.drivers import BuildIdentity, make_driver
from djinn.errors import DjinnError
from djinn.manifest import load_manifest
from djinn.plan import JobPlan, plan_build
from djinn.runner.engine import DEFAULT_TIMEOUT, Reporter, Runner, Variable
from djinn.runner.store import DirectoryArtifacts, DirectoryObjects
from djinn.status import Status

PROG = "djinn"


class TerminalReporter(Reporter):
    """Prints each job's output live under a header naming its stage and job.

    When the reader goes away (`djinn | head`) the build still runs to its end,
    quietly: its exit status and artifacts do not depend on who reads the output.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.stage: str | None = None
        self.at_line_start = True
        self.closed = False

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.out.write(data)
            self.out.flush()
        except BrokenPipeError:
            self.closed = True
            try:
                # Keep the interpreter's final flush of stdout from failing again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            except (OSError, ValueError):
                pass

    def _line(self, text: str) -> None:
        self._write((b"" if self.at_line_start else b"\n") + text.encode() + b"\n")
        self.at_line_start = True

    def job_started(self, job: JobPlan) -> None:
        if job.stage != self.stage:
            self.stage = job.stage
            self._line(f"==> Running stage {job.stage}")
        self._line(f"==> Running job {job.name} ({job.stage})")

    def job_output(self, job: JobPlan, data: bytes) -> None:
        self._write(data)
        self.at_line_start = data.endswith(b"\n")

    def job_finished(self, job: JobPlan, status: Status, ran: bool) -> None:
        if ran:
            self._line(f"==> Job {job.name} {status}")

    def build_finished(self, status: Status) -> None:
        self._line(f"==> Build {status}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run a Djinn CI build manifest locally, printing its output as it runs. "
        "Exit status: 0 when the build passed (or passed with failures), 1 when it failed, "
        "was killed or timed out, 2 for invalid input.",
    )
    parser.add_argument("-manifest", "--manifest", default=".djinn.yml", metavar="FILE", help="the build manifest (default .djinn.yml)")
    parser.add_argument(
        "-driver",
        "--driver",
        default=None,
        metavar="FILE",
        help="driver config (default: djinn-driver.conf if it exists, else $XDG_CONFIG_HOME/djinn/driver.conf "
        "if it exists, else built-in defaults)",
    )
    parser.add_argument("-objects", "--objects", default=".", metavar="DIR", help="where the manifest's objects are read from (default .)")
    parser.add_argument("-artifacts", "--artifacts", default=".", metavar="DIR", help="where artifacts are written, as DIR/<name> (default .)")
    parser.add_argument("-stage", "--stage", default=None, metavar="NAME", help="run only the setup stage and this stage")
    parser.add_argument(
        "-timeout",
        "--timeout",
        default=None,
        metavar="DURATION",
        help="bound the whole build, e.g. 90s, 10m, 1h30m (default 30m)",
    )
    add_variable_flags(parser)
    add_version_flag(parser, PROG)
    return parser


def _variables(pairs: Sequence[str], flag: str, masked: bool) -> list[Variable]:
    return [Variable(k, v, masked) for k, v in variable_pairs(pairs, flag, from_environment=masked)]


def user_driver_config() -> str | None:
    """Upstream's default driver config, $XDG_CONFIG_HOME/djinn/driver.conf (Go's os.UserConfigDir)."""
    base = os.environ.get("XDG_CONFIG_HOME") or (os.path.join(os.environ["HOME"], ".config") if os.environ.get("HOME") else None)
    return os.path.join(base, "djinn", "driver.conf") if base else None


def _driver_config(path: str | None) -> DriverConfig:
    if path is not None:
        return load_driver_config(path)
    for candidate in ("djinn-driver.conf", user_driver_config()):
        if candidate and os.path.isfile(candidate):
            return load_driver_config(candidate)
    return DriverConfig.defaults()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        warn(PROG, manifest.warnings)
        config = _driver_config(args.driver)
        warn(PROG, config.warnings)
        plan = plan_build(manifest)
        if args.stage is not None:
            try:
                plan = plan.only_stage(args.stage)
            except KeyError as exc:
                raise DjinnError(exc.args[0]) from None
        timeout = parse_duration(args.timeout).total_seconds() if args.timeout else DEFAULT_TIMEOUT
        if timeout <= 0 or timeout > threading.TIMEOUT_MAX:
            raise DjinnError(f"-timeout {args.timeout}: must be a positive duration of at most {int(threading.TIMEOUT_MAX // 3600)}h")
        variables = [Variable(k, v) for k, v in manifest.env]
        variables += _variables(args.env, "-env", False) + _variables(args.secret, "-secret", True)
        # A manifest run here may name its build (`driver: {build_id: ...}`): the docker
        # driver labels its containers with it, so a script can find them.
        identity = BuildIdentity(str(manifest.driver.get("build_id") or ""))
        driver = make_driver(manifest.driver_type, manifest.driver, identity, configured=config.settings_for(manifest.driver_type))
    except DjinnError as exc:
        return fail(PROG, exc, EXIT_INVALID)

    runner = Runner(
        plan,
        driver,
        variables=variables,
        objects=DirectoryObjects(args.objects),
        artifacts=DirectoryArtifacts(args.artifacts),
        reporter=TerminalReporter(sys.stdout.buffer),
        timeout=timeout,
    )

    def on_signal(signum: int, frame: object) -> None:
        # Cancel from another thread: the driver takes locks the interrupted code may hold.
        threading.Thread(target=runner.cancel, args=(Status.KILLED,), daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if runner.error is not None:
        print(f"{PROG}: internal error: {runner.error!r}", file=sys.stderr)
    return 0 if status.ok else 1


if __name__ == "__main__":
    sys.exit(main())
