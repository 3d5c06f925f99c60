"""Why celery stays below 5.7 (setup.cfg): 5.7.0's worker dies when Redis restarts under a running build.

This runs scripts/check-celery-upgrade, which installs that Celery from PyPI into a
scratch venv and runs tests/test_broker_restart.py with it. The test passes while the
crash is there. To see whether a newer release fixed it, run the script with that
version (or set DJINN_CELERY_CHECK_VERSION for this test): exit 0 there means the pin
can be lifted to include it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = os.environ.get("DJINN_CELERY_CHECK_VERSION", "5.7.0")


def test_celery_5_7_worker_still_dies_on_a_redis_restart(tmp_path):
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check-celery-upgrade"), VERSION, str(tmp_path / "venv")],
        cwd=ROOT, env={**os.environ, "VENV": sys.prefix}, capture_output=True, text=True, timeout=900,
    )
    out = res.stdout + res.stderr
    assert f"celery {VERSION} " in out, out[-3000:]  # the check really ran that release
    assert res.returncode != 0, f"celery {VERSION} survives a Redis restart now: the pin in setup.cfg can be lifted"
    assert "Unrecoverable error: AttributeError" in out and "has no attribute 'hostname'" in out, out[-3000:]
