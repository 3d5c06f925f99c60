"""Building a Runner for a manifest the way the offline runner does, with any driver."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from djinn.drivers.base import Driver
from djinn.manifest import Manifest, parse_manifest
from djinn.plan import plan_build
from djinn.runner import Runner, Variable
from djinn.store import DirectoryArtifacts, DirectoryObjects


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
