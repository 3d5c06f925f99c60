"""Drivers run a build's jobs somewhere: a container, a VM, another host or plain processes."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from djinn.drivers.base import BuildIdentity, Driver, Output
from djinn.errors import DriverError

# Imported on demand so the os driver works without the docker or paramiko packages loaded.
_MODULES = {"os": "djinn.drivers.os", "docker": "djinn.drivers.docker", "ssh": "djinn.drivers.ssh", "qemu": "djinn.drivers.qemu"}


def driver_class(kind: str) -> type[Driver]:
    module_name = _MODULES.get(kind)
    if module_name is None:
        raise DriverError(f"unknown driver type {kind!r} (expected one of: {', '.join(_MODULES)})")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise DriverError(f"the {kind} driver is not available in this version of djinn") from None
        raise
    driver: type[Driver] = module.DRIVER
    return driver


def make_driver(kind: str, values: Mapping[str, Any], identity: BuildIdentity | None = None, *, configured: Any = None) -> Driver:
    """A driver of `kind`: its driver-config block `configured` (defaults when None) overridden by `values`, the manifest's map."""
    return driver_class(kind)(values, identity, configured=configured)


__all__ = ["BuildIdentity", "Driver", "Output", "driver_class", "make_driver"]
