"""Build and job statuses, ordered so a build's status is the highest of its jobs'."""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    PASSED_WITH_FAILURES = "passed_with_failures"
    FAILED = "failed"
    KILLED = "killed"
    TIMED_OUT = "timed_out"

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.rank >= other.rank

    @property
    def finished(self) -> bool:
        return self.rank >= Status.PASSED.rank

    @property
    def is_failure(self) -> bool:
        """Failed, killed or timed out: the outcomes people are mailed about (SPEC section 6)."""
        return self in (Status.FAILED, Status.KILLED, Status.TIMED_OUT)

    @property
    def ok(self) -> bool:
        """Whether a build ending in this status counts as a success (exit 0)."""
        return self in (Status.PASSED, Status.PASSED_WITH_FAILURES)

    def __str__(self) -> str:
        return self.value


_ORDER = list(Status)
