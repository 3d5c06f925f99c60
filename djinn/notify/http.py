"""One HTTP POST with everything recorded: what commit statuses and webhooks send.

http.client rather than urllib: no redirects are followed (a POST must not turn
into a GET somewhere else) and a non-2xx answer is a result to record, not an
exception.
"""

from __future__ import annotations

import http.client
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TIMEOUT = 10.0
# What is kept of a response body: enough to see an error message.
BODY_LIMIT = 64 * 1024


@dataclass
class Response:
    code: int | None  # None: no answer (connection refused, timeout, TLS error)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None
    duration_ms: int = 0

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def retryable(self) -> bool:
        """Worth trying again later: no answer, a server error, or being asked to slow down."""
        return self.code is None or self.code >= 500 or self.code in (408, 429)

    def describe(self) -> str:
        if self.code is None:
            return self.error or "no response"
        text = self.body[:300].decode("utf-8", "replace").strip()
        return f"HTTP {self.code}" + (f": {text}" if text else "")


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float = TIMEOUT, verify: bool = True) -> Response:
    """POST `body` to `url`; never raises for network trouble, the Response says what happened."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    start = time.monotonic()
    try:
        if parts.scheme == "https":
            context = ssl.create_default_context() if verify else ssl._create_unverified_context()  # noqa: S323
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=timeout, context=context
            )
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        else:
            return Response(None, error=f"unsupported URL scheme in {url!r}")
        try:
            conn.request("POST", path, body=body, headers={**headers, "Content-Length": str(len(body))})
            resp = conn.getresponse()
            data = resp.read(BODY_LIMIT)
            return Response(resp.status, list(resp.getheaders()), data, duration_ms=_ms(start))
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return Response(None, error=f"{type(exc).__name__}: {exc}", duration_ms=_ms(start))


def _ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def encode_headers(headers: dict[str, str] | list[tuple[str, str]]) -> str:
    """Headers as `Name: value` lines, the way deliveries record them."""
    items = headers.items() if isinstance(headers, dict) else headers
    return "".join(f"{name}: {value}\n" for name, value in items)
