#!/usr/bin/env python3
"""Throughput and peak memory of the offline runner streaming a job that prints 1 GiB.

Measured side by side in one run against `cat` of the same bytes to /dev/null, so
the machine's noise affects both. Targets (issue 2): >= 100 MB/s, peak RSS < 150 MB.

    .venv/bin/python bench/output_throughput.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets import report


def run(argv: list[str], cwd: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, its output thrown away."""
    with open(os.devnull, "wb") as devnull:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=devnull, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{argv[0]} failed with status {status}")
    return elapsed, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB the job prints (default 1024)")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    producer = f"yes 'djinn build output line, streamed through the runner' | head -c {size}"

    work = tempfile.mkdtemp(prefix="djinn-bench-")
    try:
        Path(work, ".djinn.yml").write_text(
            "driver: {type: os}\nstages: [print]\njobs:\n"
            f"  - stage: print\n    commands:\n      - set +x\n      - \"{producer}\"\n"
        )
        djinn = shutil.which("djinn", path=os.path.dirname(sys.executable)) or shutil.which("djinn")
        if djinn is None:
            sys.exit("djinn is not installed: run scripts/venv first")
        cat_time, cat_rss = run(["/bin/sh", "-c", f"{producer} | cat"], work)
        djinn_time, djinn_rss = run([djinn, "-manifest", ".djinn.yml"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    print(f"bytes streamed:       {size} ({args.mib} MiB)")
    print(f"cat to /dev/null:     {cat_time:7.2f} s  {mb / cat_time:8.1f} MB/s  peak RSS {cat_rss / 1e6:6.1f} MB")
    print(f"djinn to /dev/null:   {djinn_time:7.2f} s  {mb / djinn_time:8.1f} MB/s  peak RSS {djinn_rss / 1e6:6.1f} MB")
    print(f"ratio djinn/cat time: {djinn_time / cat_time:7.2f}x")
    report([("output_mb_per_s", mb / djinn_time, ">=", 100), ("output_peak_rss_mb", djinn_rss / 1e6, "<=", 150)])


if __name__ == "__main__":
    main()
