"""Celery settings for `celery -A djinn worker`, read from the djinn worker config.

The config file is named by DJINN_WORKER_CONFIG (default djinn-worker.conf), the
driver config by DJINN_DRIVER_CONFIG (default djinn-driver.conf). Installed as a
top-level module so Celery finds it from any directory.
"""

import sys

from djinn.config import load_worker_config
from djinn.errors import DjinnError
from djinn.worker.queue import celery_settings, config_paths

try:
    _config = load_worker_config(config_paths()[0])
except DjinnError as exc:
    # Celery imports this module itself and would show a traceback: a config error is
    # one line, as djinn-worker prints it, and the exit status says bad input.
    print(f"celery -A djinn: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

globals().update(celery_settings(_config))
