"""The suite's own scheduling: the docker-engine group must reach pytest-xdist (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.xdist_group("docker-engine")
def test_docker_engine_group_reaches_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        # Run outside scripts/test's scheduler: ask it, by running this test under it.
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1", "--dist", "loadgroup",
             f"{Path(__file__).relative_to(ROOT)}::{request.node.name}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout + res.stderr
        return
    # pytest-xdist keeps a group on one process by naming its tests `<id>@<group>`;
    # when that renaming has no effect the group is spread over every process.
    assert request.node.nodeid.endswith("@docker-engine"), (
        f"{request.node.nodeid}: pytest-xdist did not group this test; check the pytest pin in setup.cfg"
    )
