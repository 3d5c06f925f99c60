"""djinn: the Python build worker for Djinn CI.

The path of a build through the package: manifest -> plan -> (tasks -> builds in
PostgreSQL) -> runner -> drivers -> store.
"""

__version__ = "0.1.0"
