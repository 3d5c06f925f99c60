"""Command-line entry points. Errors a user can act on are printed without a traceback.

Exit status, the same for both commands: 0 done, 1 the build failed or a
service (PostgreSQL, Redis) is unreachable, 2 invalid input (flags, files,
config, manifest).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, NoReturn, Sequence

from djinn import __version__
from djinn.errors import DjinnError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


class InputError(DjinnError):
    """Bad input on the command line or in a file it names: exit 2."""


class Unreachable(DjinnError):
    """A service the command needs (PostgreSQL, Redis) cannot be reached: exit 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with Go-style single-dash long flags (`-config`) and exit code 2 on bad input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message}\n")


def version() -> str:
    """The installed package's version, else the source tree's."""
    try:
        return package_version("djinn-worker")
    except PackageNotFoundError:
        return __version__


def add_version_flag(parser: argparse.ArgumentParser, prog: str) -> None:
    """`-version`: print `PROG VERSION OS/ARCH` as upstream's commands do, and exit 0."""
    line = f"{prog} {version()} {sys.platform}/{platform.machine() or 'unknown'}"
    parser.add_argument("-version", "--version", action="version", version=line, help="print the version and exit")


def add_variable_flags(parser: argparse.ArgumentParser) -> None:
    """`-env KEY=VALUE` and `-secret KEY`, the same on both commands (read with `variable_pairs`)."""
    parser.add_argument("-env", "--env", action="append", default=[], metavar="KEY=VALUE", help="add a build variable (repeatable)")
    parser.add_argument(
        "-secret",
        "--secret",
        action="append",
        default=[],
        metavar="KEY",
        help="add a masked build variable (shown as xxxxxx in output), its value taken from the environment "
        "variable KEY; KEY=VALUE works too, but the value is then visible to ps (repeatable)",
    )


def fail(prog: str, error: DjinnError | str, code: int = EXIT_INVALID) -> int:
    print(f"{prog}: {error}", file=sys.stderr)
    return code


def warn(prog: str, warnings: Sequence[str]) -> None:
    """Config warnings (ignored keys, deprecated spellings) on standard error."""
    for line in warnings:
        print(f"{prog}: warning: {line}", file=sys.stderr)


def check_text(value: str, what: str) -> str:
    """`value` if it is valid UTF-8 text; command-line bytes that are not arrive as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8") from None
    if "\0" in value:
        raise InputError(f"{what} contains a NUL byte")
    return value


def read_text_file(path: str, what: str) -> str:
    """A file's text, refusing what is not UTF-8 with a message naming the file."""
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise InputError(f"{what}{path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what}{path}: not valid UTF-8 (byte {exc.start})") from None


def variable_pairs(values: Sequence[str], flag: str, *, from_environment: bool, form: str = "KEY=VALUE") -> list[tuple[str, str]]:
    """`KEY=VALUE` flags (every command's); with `from_environment`, a bare `KEY` takes the value of $KEY.

    The bare form keeps secrets out of the process's argv (visible to `ps`). `form`
    is how the messages spell the flag's value (`-key NAME=FILE`).
    """
    out = []
    for value in values:
        key, eq, val = value.partition("=")
        check_text(key, f"{flag} name")
        if not key:
            raise InputError(f"{flag} {value!r}: expected {form}" + (" or KEY" if from_environment else ""))
        if not eq:
            if not from_environment:
                raise InputError(f"{flag} {value!r}: expected {form}")
            env = os.environ.get(key)
            if env is None:
                raise InputError(f"{flag} {key}: no '=' and no environment variable {key} to take the value from")
            val = env
        out.append((key, check_text(val, f"{flag} {key} value")))
    return out
