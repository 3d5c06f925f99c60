"""Command-line entry points. Errors a user can act on are printed without a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from djinn.errors import DjinnError

EXIT_INVALID = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with Go-style single-dash long flags (`-config`) and exit code 2 on bad input."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message}\n")


def fail(prog: str, error: DjinnError | str, code: int = EXIT_INVALID) -> int:
    print(f"{prog}: {error}", file=sys.stderr)
    return code
