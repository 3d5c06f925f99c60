"""Celery settings for `celery -A djinn worker`, read from the djinn worker config.

The config file is named by DJINN_WORKER_CONFIG (default djinn-worker.conf), the
driver config by DJINN_DRIVER_CONFIG (default djinn-driver.conf). Installed as a
top-level module so Celery finds it from any directory.
"""

from djinn.config import load_worker_config
from djinn.worker.queue import celery_settings, config_paths

globals().update(celery_settings(load_worker_config(config_paths()[0])))
