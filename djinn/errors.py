"""Exceptions a user can act on: the CLIs print their message without a traceback."""

from __future__ import annotations


class DjinnError(Exception):
    """Base of every error djinn reports to a user."""


class ConfigError(DjinnError):
    """A worker or driver config file is malformed or invalid."""


class ManifestError(DjinnError):
    """A build manifest is malformed or invalid; carries every problem found."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = problems
        self.path = path
        prefix = f"{path}: " if path else ""
        super().__init__("\n".join(prefix + p for p in problems))


class DriverError(DjinnError):
    """A driver could not create, use or tear down its build environment."""


class DatabaseError(DjinnError):
    """PostgreSQL cannot be reached or refused what the worker asked."""
