"""Building a Runner for a manifest the way the offline runner does, with any driver."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from djinn.drivers.base import Driver
from djinn.manifest import Manifest, parse_manifest
from djinn.plan import plan_build
from djinn.runner.engine import Runner, Variable
from djinn.runner.store import DirectoryArtifacts, DirectoryObjects


def runner_for(manifest: str, driver_for: Callable[[Manifest], Driver], reporter, tmp_path: Path, **kwargs) -> tuple[Runner, Driver]:
    """A Runner over `manifest` with objects from tmp_path/objects and artifacts to tmp_path/artifacts."""
    m = parse_manifest(manifest)
    driver = driver_for(m)
    variables = kwargs.pop("variables", [Variable(k, v) for k, v in m.env])
    runner = Runner(
        plan_build(m),
        driver,
        variables=variables,
        objects=DirectoryObjects(tmp_path / "objects"),
        artifacts=DirectoryArtifacts(tmp_path / "artifacts"),
        reporter=reporter,
        **kwargs,
    )
    return runner, driver


#: A masked value with every character a shell quotes in a `set -x` trace: ', $, space, tab, \ and a newline.
SECRET_VALUE = "Pa55'w0rd $HOME\ts3cond\\half\nth1rd-line"
#: Pieces of SECRET_VALUE that no quoting of it hides: none may appear in a build's output.
SECRET_PIECES = ("Pa55", "w0rd", "s3cond", "half", "th1rd")
#: Commands that print the value, traced by `set -x` in each of them; the last proves the job saw it.
SECRET_COMMANDS = (
    ': "$SECRET"',
    'COPY="$SECRET"',
    'echo "$SECRET"',
    "printf '%s\\n' \"$SECRET\"",
    'echo "<<${SECRET}>>"',
    'test "${#SECRET}" = ' + str(len(SECRET_VALUE)) + ' && echo "secret has the right length"',
)
#: What bash adds: its own quotings, printed and traced.
BASH_SECRET_COMMANDS = ("printf '%q\\n' \"$SECRET\"", 'echo "${SECRET@Q}"')


def assert_no_secret(text: str) -> None:
    """Fails naming the piece of the masked value that leaked, with the output around it."""
    for piece in SECRET_PIECES:
        at = text.find(piece)
        assert at < 0, f"masked value leaked ({piece!r}): {text[max(0, at - 80):at + 80]!r}"
    assert "secret has the right length" in text, text
