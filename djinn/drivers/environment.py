"""The build environment for drivers whose jobs cannot be handed variables directly.

docker and ssh give a job's shell a file of exports to source instead.
"""

from __future__ import annotations

import re
import shlex
from typing import Mapping

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def shell_exports(env: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """`export K='v'` lines for a file a job's shell sources, and the names a shell cannot set.

    Drivers hand the build environment over in such a file (private to the build)
    rather than on a command line or in a container's config, where `ps` or
    `docker inspect` would show masked values.
    """
    lines, refused = [], []
    for key, value in env.items():
        if _SHELL_NAME.match(key):
            lines.append(f"export {key}={shlex.quote(str(value))}\n")
        else:
            refused.append(key)
    return "".join(lines).encode("utf-8", "surrogateescape"), refused


def refused_names_message(refused: list[str]) -> bytes:
    """The job output line telling which variables were left out, and why."""
    names = ", ".join(repr(k) for k in refused)
    return f"djinn: variables {names} are not shell names (letters, digits, _): jobs do not get them\n".encode()
