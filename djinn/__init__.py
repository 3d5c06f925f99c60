"""djinn: the Python build worker for Djinn CI.

The path of a build through the package: manifest -> plan -> db.submit (rows
in PostgreSQL) -> tasks (Celery) -> worker.execute -> runner -> drivers ->
runner.store, with db.recorder writing the run's progress back.

`celery -A djinn worker` finds the Celery app here as `djinn.app` (djinn.worker.queue
makes it); it is made on first use so the offline runner never loads Celery.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name in ("app", "celery"):
        if _app is None:
            # Made on first use: `import djinn` (the CLIs, the tests) must not load Celery.
            from djinn.worker.queue import make_app

            _app = make_app()
        return _app
    raise AttributeError(name)
