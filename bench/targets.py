"""The last lines every bench prints: one machine-readable line per target, and its exit status."""

from __future__ import annotations

import sys


def report(targets: list[tuple[str, float, str, float]]) -> None:
    """Print `target <name>: <value> (goal <op> <limit>) met|missed` for each (name, value, op, limit), then exit.

    The exit status is 0 only when every target is met, so a script or CI can run a bench as a check.
    """
    missed = 0
    for name, value, op, limit in targets:
        met = value <= limit if op == "<=" else value >= limit
        missed += not met
        print(f"target {name}: {value:.3f} (goal {op} {limit:g}) {'met' if met else 'missed'}")
    sys.exit(1 if missed else 0)
