"""The Tinybird HTTP API, as far as bucketer uses it: the Events API and on-demand copy pipes.

Contract (TINYBIRD.md):
- ``TinybirdClient(url, token)`` is a context manager; no network in the constructor.
- ``post_events(datasource, body, gzipped)`` POSTs NDJSON to ``/v0/events?name=...&wait=true`` and
  returns ``EventsResult`` on 200/202, else raises one typed error:
  ``TinybirdRetryable`` (429, 500, 502, 503, 504, timeouts, connection errors; ``delay`` is the server's
  ``Retry-After`` or ``X-RateLimit-Reset`` in seconds when it gave one), ``TinybirdTooLarge`` (413: split
  the batch), ``TinybirdConfigError`` (400, 403, 404 and other 4xx: configuration, not data; stop),
  ``TinybirdPartialWrite`` (422: partly written, retrying may duplicate; stop loudly).
- ``start_copy(pipe, mode)`` starts a copy job and returns its id; ``job(id)`` returns the job's JSON.
- ``query(sql)`` runs a read-only query (``GET /v0/sql?q=... FORMAT JSON``) and returns its ``data`` rows.
- The token is a ``Secret``: it is sent in the Authorization header only and never appears in a repr,
  a log line or an error message (response texts are redacted as well).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from connectors.secret import Secret as Secret  # the one Secret type, re-exported for this API's callers

log = logging.getLogger("bucketer.tinybird")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class TinybirdError(RuntimeError):
    """Base of the API errors; ``status`` is the HTTP status (None for transport errors)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status, self.body = status, body


class TinybirdRetryable(TinybirdError):
    def __init__(self, message: str, status: int | None = None, body: str = "", delay: float | None = None) -> None:
        super().__init__(message, status, body)
        self.delay = delay


class TinybirdTooLarge(TinybirdError):
    """413: the request body is over the limit; send it in smaller parts."""


class TinybirdConfigError(TinybirdError):
    """400/403/404 (and other unexpected 4xx): wrong token, data source, region host or request."""


class TinybirdPartialWrite(TinybirdError):
    """422: the rows were partly written (e.g. a materialized view failed); a retry may duplicate."""


@dataclass(frozen=True)
class EventsResult:
    status: int
    successful_rows: int
    quarantined_rows: int


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class TinybirdClient:
    def __init__(
        self, url: str, token: Secret, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self._token, self._timeout, self._transport = token, timeout, transport
        self._http: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"TinybirdClient(url={self.url!r}, token=***)"

    def __enter__(self) -> TinybirdClient:
        self._http = httpx.Client(
            base_url=self.url,
            timeout=self._timeout,
            transport=self._transport,
            headers={"Authorization": f"Bearer {self._token.reveal()}"},
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def http(self) -> httpx.Client:
        assert self._http is not None, "TinybirdClient used outside its context"
        return self._http

    def _request(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise TinybirdRetryable(f"{what}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TinybirdRetryable(f"{what}: {self._token.redact(str(exc)) or type(exc).__name__}") from None

    def _raise_for(self, resp: httpx.Response, what: str) -> None:
        status = resp.status_code
        if status < 400:
            return
        body = self._token.redact(resp.text[:2000])
        message = f"{what}: HTTP {status} {body}".strip()
        if status in RETRYABLE_STATUS:
            delay = _seconds(resp.headers.get("Retry-After"))
            if delay is None:
                delay = _seconds(resp.headers.get("X-RateLimit-Reset"))
            raise TinybirdRetryable(message, status, body, delay if status == 429 else None)
        if status == 413:
            raise TinybirdTooLarge(message, status, body)
        if status == 422:
            raise TinybirdPartialWrite(message, status, body)
        hint = {
            403: " (check the token and its append scope)",
            404: " (wrong data source or region host?)",
            401: " (check the token)",
        }.get(status, "")
        raise TinybirdConfigError(message + hint, status, body)

    def post_events(self, datasource: str, body: bytes, gzipped: bool = False) -> EventsResult:
        headers = {"Content-Type": "application/x-ndjson"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        what = f"POST events to {datasource}"
        resp = self._request(
            "POST", "/v0/events", what, params={"name": datasource, "wait": "true"}, content=body, headers=headers
        )
        self._raise_for(resp, what)
        try:
            doc = orjson.loads(resp.content) if resp.content else {}
        except orjson.JSONDecodeError:
            doc = {}
        return EventsResult(
            resp.status_code, int(doc.get("successful_rows", 0) or 0), int(doc.get("quarantined_rows", 0) or 0)
        )

    def start_copy(self, pipe: str, mode: str = "replace") -> str:
        what = f"start copy pipe {pipe}"
        resp = self._request("POST", f"/v0/pipes/{pipe}/copy", what, params={"_mode": mode})
        self._raise_for(resp, what)
        doc = orjson.loads(resp.content)
        job = doc.get("job") or {}
        job_id = doc.get("job_id") or job.get("id") or job.get("job_id") or doc.get("id")
        if not job_id:
            raise TinybirdError(f"{what}: no job id in the answer {self._token.redact(resp.text[:500])}")
        return str(job_id)

    def query(self, sql: str) -> list[dict[str, Any]]:
        what = "query /v0/sql"
        resp = self._request("GET", "/v0/sql", what, params={"q": f"{sql} FORMAT JSON"})
        self._raise_for(resp, what)
        rows: list[dict[str, Any]] = orjson.loads(resp.content).get("data", [])
        return rows

    def job(self, job_id: str) -> dict[str, Any]:
        what = f"poll job {job_id}"
        resp = self._request("GET", f"/v0/jobs/{job_id}", what)
        self._raise_for(resp, what)
        doc: dict[str, Any] = orjson.loads(resp.content)
        return doc
