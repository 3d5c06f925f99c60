#!/usr/bin/env python3
"""What the docker driver adds over bare `docker run --rm IMAGE true`, measured side by side in one run.

A 1-job `true` build run through the Runner in this (warm) process, driver creation
and teardown included, against one bare `docker run --rm IMAGE true`; and a 5-job
build against five bare runs one after another. Rounds alternate the four so the
machine's drift hits all of them; medians are compared.
Targets (issue 14): <= 1.1x for one job, <= 0.75x per job for five (the next job's container is made while one runs).

    .venv/bin/python bench/docker_overhead.py [--rounds 7] [--image djinn-test/busybox:latest]

Needs a Docker engine and the test image: runs scripts/docker-engine and
scripts/docker-test-image first (quick when already done).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from targets import report

from djinn.drivers import make_driver
from djinn.manifest import parse_manifest
from djinn.plan import plan_build
from djinn.runner.engine import Reporter, Runner
from djinn.status import Status

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "djinn-test/busybox:latest"


def manifest(image: str, jobs: int) -> str:
    lines = [f"driver: {{type: docker, image: '{image}', workspace: /workspace}}", "stages: [run]", "jobs:"]
    lines += ["  - {stage: run, commands: ['true']}"] * jobs
    return "\n".join(lines) + "\n"


def build(text: str) -> float:
    """Seconds for one whole build through the Runner: driver creation to teardown."""
    m = parse_manifest(text)
    start = time.perf_counter()
    driver = make_driver("docker", dict(m.driver))
    status = Runner(plan_build(m), driver, reporter=Reporter()).run()
    elapsed = time.perf_counter() - start
    if status is not Status.PASSED:
        sys.exit(f"the benchmark build ended {status}")
    return elapsed


def bare(docker: str, image: str, runs: int) -> float:
    """Seconds for `runs` bare `docker run --rm IMAGE true` one after another."""
    start = time.perf_counter()
    for _ in range(runs):
        subprocess.run([docker, "run", "--rm", image, "true"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument("--image", default=IMAGE, help=f"image to run (default {IMAGE})")
    args = parser.parse_args()
    subprocess.run([ROOT / "scripts" / "docker-engine"], check=True)
    if args.image == IMAGE:
        subprocess.run([ROOT / "scripts" / "docker-test-image"], check=True)
    docker = shutil.which("docker")
    if docker is None:
        sys.exit("no docker client on PATH")

    one, five = manifest(args.image, 1), manifest(args.image, 5)
    build(one), bare(docker, args.image, 1)  # warm-up: imports, caches, the engine's first container
    times: dict[str, list[float]] = {"build1": [], "bare1": [], "build5": [], "bare5": []}
    for _ in range(args.rounds):
        times["bare1"].append(bare(docker, args.image, 1))
        times["build1"].append(build(one))
        times["bare5"].append(bare(docker, args.image, 5))
        times["build5"].append(build(five))
    med = {k: statistics.median(v) for k, v in times.items()}
    r1 = med["build1"] / med["bare1"]
    r5 = med["build5"] / med["bare5"]
    print(f"rounds: {args.rounds}, image: {args.image}, medians:")
    print(f"  bare docker run --rm, 1 run:  {med['bare1'] * 1000:8.1f} ms")
    print(f"  djinn build, 1 job:           {med['build1'] * 1000:8.1f} ms")
    print(f"  bare docker run --rm, 5 runs: {med['bare5'] * 1000:8.1f} ms ({med['bare5'] * 200:.1f} ms each)")
    print(f"  djinn build, 5 jobs:          {med['build5'] * 1000:8.1f} ms ({med['build5'] * 200:.1f} ms each)")
    print(f"ratio 1 job:           {r1:5.2f}x")
    print(f"ratio per job, 5 jobs: {r5:5.2f}x")
    report([("docker_one_job", r1, "<=", 1.1), ("docker_per_job_of_five", r5, "<=", 0.75)])


if __name__ == "__main__":
    main()
