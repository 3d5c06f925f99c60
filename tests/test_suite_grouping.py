"""The suite's own scheduling: the docker-engine group must reach pytest-xdist (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("docker-engine")
def test_docker_engine_group_reaches_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup (scripts/test does)")
    # pytest-xdist keeps a group on one process by naming its tests `<id>@<group>`;
    # when that renaming has no effect the group is spread over every process.
    assert request.node.nodeid.endswith("@docker-engine"), (
        f"{request.node.nodeid}: pytest-xdist did not group this test; check the pytest pin in setup.cfg"
    )
