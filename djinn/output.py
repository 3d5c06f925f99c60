"""Job output filtering: masking of secret values and NUL replacement, done on a stream."""

from __future__ import annotations

import re
from typing import Iterable

MASK = b"xxxxxx"


class Masker:
    """Replaces secret values in a byte stream, also when a value is split across two chunks.

    It holds back only the tail of a chunk that could be the start of a secret, so
    output that contains no secret prefix flows through undelayed.
    """

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        values = {s.encode() if isinstance(s, str) else bytes(s) for s in secrets}
        values.discard(b"")
        self._values = sorted(values, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(v) for v in self._values)) if self._values else None
        self._prefixes = {v[:k] for v in self._values for k in range(1, len(v))}
        self._longest_prefix = max((len(v) - 1 for v in self._values), default=0)
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Filter `chunk`; returns what is safe to emit now."""
        if self._pattern is None:
            return chunk.replace(b"\0", b"NUL")
        data = self._pending + chunk if self._pending else chunk
        data = self._pattern.sub(MASK, data)
        keep = 0
        for k in range(min(self._longest_prefix, len(data)), 0, -1):
            if data[-k:] in self._prefixes:
                keep = k
                break
        if keep:
            self._pending = data[-keep:]
            data = data[:-keep]
        else:
            self._pending = b""
        return data.replace(b"\0", b"NUL")

    def flush(self) -> bytes:
        """Whatever was held back: at the end of a stream it can no longer become a secret."""
        data, self._pending = self._pending, b""
        return data.replace(b"\0", b"NUL")

    def mask(self, data: bytes) -> bytes:
        """Filter a complete piece of output (mail bodies, messages)."""
        if self._pattern is not None:
            data = self._pattern.sub(MASK, data)
        return data.replace(b"\0", b"NUL")


def job_script(commands: Iterable[str]) -> bytes:
    """The script a job runs: output merged, each command traced into the output."""
    lines = ["#!/bin/sh", "exec 2>&1", "set -ex", *commands]
    return ("\n".join(lines) + "\n").encode()
