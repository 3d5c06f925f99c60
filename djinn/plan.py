"""The build plan: the stages and jobs a manifest turns into (SPEC section 2).

Plain data, so the offline runner and the database layer lay out a build the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from djinn.manifest import Manifest, Passthrough, Source, slugify

CREATE_DRIVER = "create-driver"


@dataclass(frozen=True)
class JobPlan:
    stage: str
    name: str
    commands: tuple[str, ...]
    artifacts: tuple[Passthrough, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """Names a job within its build: what the reporters key their rows and timings by."""
        return (self.stage, self.name)


@dataclass(frozen=True)
class StagePlan:
    name: str
    can_fail: bool
    jobs: tuple[JobPlan, ...]


@dataclass(frozen=True)
class BuildPlan:
    stages: tuple[StagePlan, ...]
    objects: tuple[Passthrough, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def setup(self) -> StagePlan:
        return self.stages[0]

    def jobs(self) -> Iterator[JobPlan]:
        for stage in self.stages:
            yield from stage.jobs

    def only_stage(self, name: str) -> "BuildPlan":
        """The plan cut down to the setup stage and one named stage (the `-stage` flag)."""
        keep = [s for s in self.stages[1:] if s.name == name]
        if not keep:
            names = ", ".join(s.name for s in self.stages[1:]) or "none"
            raise KeyError(f"no stage named {name!r} in the manifest (stages: {names})")
        return BuildPlan(stages=(self.setup, *keep), objects=self.objects, env=self.env)


#: The server names a build's setup stage by its number: "setup - #12".
SETUP_STAGE_PREFIX = "setup - #"


def setup_stage_name(number: int | None) -> str:
    return "setup" if number is None else f"{SETUP_STAGE_PREFIX}{number}"


def clone_commands(source: Source) -> tuple[str, ...]:
    """The server's clone job commands (without a ref it adds a bare `git checkout`, a no-op left out here)."""
    commands = [f"mkdir -p {source.dir}", f"git clone -q {source.url} {source.dir}", f"cd {source.dir}"]
    if source.ref:
        commands.append(f"git checkout {source.ref}")
    return tuple(commands)


def plan_build(manifest: Manifest, number: int | None = None) -> BuildPlan:
    """Lay out the setup stage and the manifest's stages and jobs, in run order."""
    setup_name = setup_stage_name(number)
    setup_jobs = [JobPlan(setup_name, CREATE_DRIVER, ())]
    for i, source in enumerate(manifest.sources):  # clone.0, clone.1, ... as the server numbers them
        setup_jobs.append(JobPlan(setup_name, f"clone.{i}", clone_commands(source)))

    by_stage: dict[str, list[JobPlan]] = {name: [] for name in manifest.stages}
    previous, n = None, 0
    for job in manifest.jobs:
        n = n + 1 if job.stage == previous else 1
        previous = job.stage
        name = slugify(job.name if job.name is not None else f"{job.stage}.{n}")
        by_stage[job.stage].append(JobPlan(job.stage, name, job.commands, job.artifacts))

    stages = [StagePlan(setup_name, False, tuple(setup_jobs))]
    allowed = set(manifest.allow_failures)
    for name in manifest.stages:
        stages.append(StagePlan(name, name in allowed, tuple(by_stage[name])))
    return BuildPlan(stages=tuple(stages), objects=manifest.objects, env=manifest.env)
