"""Job output filtering: masking of secret values and NUL replacement, done on a stream.

A job script runs under `set -x`, so a secret does not only reach the output as
itself: the shell's trace prints it quoted. Every form in which bash, dash and
busybox ash write a value (found by running them) is masked, not just the raw bytes.
"""

from __future__ import annotations

import re
from typing import Iterable

MASK = b"xxxxxx"

# Bytes `printf %q` (bash) puts a backslash before anywhere in a word; `#` and `~` only at its start.
_BACKSLASHED = frozenset(b" !\"$&'()*,;<>?[\\]^`{|}")
_BACKSLASHED_FIRST = frozenset(b"#~")
# bash's $'...' (ANSI-C) escapes for control bytes; other unprintable bytes become \ooo.
_ANSI_C = {0x07: b"\\a", 0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0B: b"\\v", 0x0C: b"\\f", 0x0D: b"\\r",
           0x1B: b"\\E", 0x5C: b"\\\\", 0x27: b"\\'"}
_QUOTE_RUN = re.compile(b"'+")


def traced_forms(value: bytes) -> set[bytes]:
    """Every byte string in which a shell may print `value`: as is, and as its `set -x` and `%q` quotings.

    A quoted form is given without its outer quotes (and busybox's without a closing
    quote that it leaves out at the end of a word), so it is found also when the value
    is only part of a traced word.
    """
    # As printed by bash's printf %q / ${var@Q} (backslashes, or $'...' for unprintable bytes;
    # multi-byte characters stay raw in a UTF-8 locale and become \ooo in C).
    escaped = {value, _ansi_c(value, raw_high=True), _ansi_c(value, raw_high=False), _backslashed(value)}
    if value[:1] and value[0] in _BACKSLASHED_FIRST:
        escaped.add(b"\\" + _backslashed(value))
    # ... and each of those inside single quotes, as `set -x` prints a word (also a word made by %q).
    forms = set(escaped)
    for form in escaped:
        # bash: 'it'\''s'; and that quoted once more (`echo "${var@Q}"` traced).
        forms.add(form.replace(b"'", b"'\\''"))
        forms.add(form.replace(b"'", b"'\\''").replace(b"'", b"'\\''"))
        # busybox ash: 'it'"'"'s', one "..." per run of quotes; a trailing run is not reopened.
        busybox = _QUOTE_RUN.sub(lambda m: b"'\"" + m.group() + b"\"'", form)
        forms.add(busybox[:-1] if form.endswith(b"'") else busybox)
    forms.discard(b"")
    return forms


def _backslashed(value: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in _BACKSLASHED else bytes([c]) for c in value)


def _ansi_c(value: bytes, raw_high: bool) -> bytes:
    out = bytearray()
    for c in value:
        if c in _ANSI_C:
            out += _ANSI_C[c]
        elif c < 0x20 or c == 0x7F or (c >= 0x80 and not raw_high):
            out += b"\\%03o" % c
        else:
            out.append(c)
    return bytes(out)


class Masker:
    """Replaces secret values in a byte stream, also when a value is split across two chunks.

    It holds back only the tail of a chunk that could be the start of a secret, so
    output that contains no secret prefix flows through undelayed. Work per chunk is
    linear in the chunk plus the longest secret (no table of every prefix).
    """

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        values: set[bytes] = set()
        for secret in secrets:
            raw = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else bytes(secret)
            if raw:
                values |= traced_forms(raw)
        self._values = sorted(values, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(v) for v in self._values)) if self._values else None
        self._by_first: dict[int, list[bytes]] = {}
        for v in self._values:
            if len(v) > 1:
                self._by_first.setdefault(v[0], []).append(v)
        self._starts = (
            re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in sorted(self._by_first)) + b"]")
            if self._by_first
            else None
        )
        self._longest_prefix = max((len(v) - 1 for v in self._values), default=0)
        self._pending = b""

    def _cut(self, data: bytes) -> int:
        """Where `data` may be filtered up to: before the earliest tail that could still become a secret form.

        Everything from the cut on is held for the next chunk: a form that began there
        would otherwise be passed on half (or a shorter form inside it masked instead).
        """
        cut = len(data)
        if self._starts is not None:
            for start in self._starts.finditer(data, max(0, len(data) - self._longest_prefix)):
                tail = data[start.start():]
                if any(len(v) > len(tail) and v.startswith(tail) for v in self._by_first[tail[0]]):
                    cut = start.start()
                    break
        if cut < len(data) and self._pattern is not None:
            # A whole form across the cut is held whole, not split (forms are at most longest_prefix + 1 long).
            for match in self._pattern.finditer(data, max(0, cut - self._longest_prefix)):
                if match.start() >= cut:
                    break
                if match.end() > cut:
                    cut = match.start()
                    break
        return cut

    def feed(self, chunk: bytes) -> bytes:
        """Filter `chunk`; returns what is safe to emit now."""
        if self._pattern is None:
            return chunk.replace(b"\0", b"NUL")
        data = self._pending + chunk if self._pending else chunk
        cut = self._cut(data)
        self._pending = data[cut:]
        return self._pattern.sub(MASK, data[:cut]).replace(b"\0", b"NUL")

    def flush(self) -> bytes:
        """Whatever was held back, masked: at the end of a stream no form can complete any more."""
        data, self._pending = self._pending, b""
        return self.mask(data)

    def mask(self, data: bytes) -> bytes:
        """Filter a complete piece of output (mail bodies, messages)."""
        if self._pattern is not None:
            data = self._pattern.sub(MASK, data)
        return data.replace(b"\0", b"NUL")


def job_script(commands: Iterable[str]) -> bytes:
    """The script a job runs: output merged, each command traced into the output."""
    lines = ["#!/bin/sh", "exec 2>&1", "set -ex", *commands]
    return ("\n".join(lines) + "\n").encode()
