from djinn.manifest import parse_manifest
from djinn.plan import plan_build, slugify


def test_slugify():
    assert slugify("  Unit Tests!! (fast) ") == "unit-tests-fast"
    assert slugify("build.1") == "build.1"
    assert slugify("--a__b--") == "a-b"


def test_setup_stage_clone_jobs_and_naming():
    m = parse_manifest(
        """
driver: {type: os}
sources:
  - https://example.com/org/repo.git
  - https://example.com/org/lib main => vendor/lib
stages: [build, test]
allow_failures: [test]
jobs:
  - {stage: build, commands: [a]}
  - {stage: build, name: Named Job, commands: [b]}
  - {stage: test, commands: [c]}
  - {stage: build, commands: [d]}
  - {stage: build, commands: [e]}
"""
    )
    plan = plan_build(m, number=7)
    setup, build, test = plan.stages
    assert setup.name == "setup - #7" and not setup.can_fail
    assert [j.name for j in setup.jobs] == ["create-driver", "clone.0", "clone.1"]
    assert setup.jobs[0].commands == ()
    assert setup.jobs[1].commands == (
        "mkdir -p repo",
        "git clone -q https://example.com/org/repo.git repo",
        "cd repo",
    )
    assert setup.jobs[2].commands[-1] == "git checkout main"
    # The counter restarts whenever the stage changes between consecutive jobs.
    assert [j.name for j in build.jobs] == ["build.1", "named-job", "build.1", "build.2"]
    assert [j.name for j in test.jobs] == ["test.1"]
    assert test.can_fail and not build.can_fail
    assert [j.name for j in plan.only_stage("test").jobs()] == ["create-driver", "clone.0", "clone.1", "test.1"]
