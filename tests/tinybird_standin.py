"""A local stand-in of the Tinybird API for tests: the Events API and on-demand copy pipes.

Implements the documented contract (TINYBIRD.md): ``POST /v0/events?name=DS&wait=true`` with a Bearer
token, NDJSON body (gzip accepted); 200 with ``{"successful_rows", "quarantined_rows"}`` (lines that are
not JSON objects are quarantined, not rejected); 403 for a wrong token; 413 over ``max_body`` bytes
(uncompressed); ``POST /v0/pipes/{pipe}/copy?_mode=...`` starting a job, ``GET /v0/jobs/{id}`` with
``waiting`` -> ``working`` -> ``done``, at most ``copy_concurrency`` jobs working at once.

Failures are scripted per data source: ``standin.script("ds", Reply(429, {"Retry-After": "1"}), ...)``
queues answers that are used, in order, for the next requests to that data source (``"*"`` for any).
``GET /v0/sql`` answers with ``standin.sql(q)``. ``Reply(200, delay=2)`` answers slowly;
``Reply(200, quarantine=3)`` writes but reports 3 rows quarantined; ``Reply(422)`` writes half the rows,
then fails. Everything received is recorded.
"""

from __future__ import annotations

import gzip
import itertools
import json
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    quarantine: int = 0
    body: str | None = None


@dataclass
class Received:
    datasource: str
    at: float
    status: int
    lines: int
    gzipped: bool
    size: int


@dataclass
class Job:
    id: str
    pipe: str
    mode: str
    created: float
    started: float | None = None
    status: str = "waiting"


class Standin:
    def __init__(
        self,
        token: str = "p.test-token-0123456789",
        max_body: int = 10_000_000,
        copy_concurrency: int = 12,
        job_seconds: float = 0.3,
    ) -> None:
        self.token, self.max_body = token, max_body
        self.copy_concurrency, self.job_seconds = copy_concurrency, job_seconds
        self.rows: dict[str, list[bytes]] = defaultdict(list)
        self.quarantined: dict[str, int] = defaultdict(int)
        self.received: list[Received] = []
        self.jobs: dict[str, Job] = {}
        self.max_working = 0
        self.max_open = 0  # jobs started by clients and not yet seen finished by them
        self._seen_final: set[str] = set()
        self.failing_pipes: set[str] = set()
        self.queries: list[str] = []
        self.sql: Callable[[str], list[dict[str, Any]]] = lambda q: []  # answers GET /v0/sql
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> Standin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delays

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                standin.handle(self, "POST")

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                standin.handle(self, "GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def script(self, datasource: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[datasource].extend(replies)

    def requests_to(self, datasource: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.datasource == datasource]

    # --- HTTP -----------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.answer(h, 403, {"error": "invalid authentication token"})
        if method == "POST" and url.path == "/v0/events":
            return self.events(h, query, raw)
        parts = url.path.strip("/").split("/")
        if method == "POST" and len(parts) == 4 and parts[:2] == ["v0", "pipes"] and parts[3] == "copy":
            return self.start_copy(h, parts[2], query.get("_mode", "append"))
        if method == "GET" and url.path == "/v0/sql":
            with self._lock:
                self.queries.append(query.get("q", ""))
            return self.answer(h, 200, {"meta": [], "data": self.sql(query.get("q", ""))})
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v0", "jobs"]:
            return self.job(h, parts[2])
        return self.answer(h, 404, {"error": f"not found: {url.path}"})

    def answer(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        doc: Any,
        headers: dict[str, str] | None = None,
        text: str | None = None,
    ) -> None:
        body = (text if text is not None else json.dumps(doc)).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def events(self, h: BaseHTTPRequestHandler, query: dict[str, str], raw: bytes) -> None:
        ds = query.get("name", "")
        gz = h.headers.get("Content-Encoding") == "gzip"
        body = gzip.decompress(raw) if gz else raw
        lines = [line for line in body.split(b"\n") if line]
        with self._lock:
            script = self._scripts[ds] or self._scripts["*"]
            reply = script.popleft() if script else Reply()
        if reply.delay:
            time.sleep(reply.delay)
        status = reply.status
        if len(body) > self.max_body:
            status = 413
        elif query.get("wait") != "true":
            status = 400 if status == 200 else status  # this client always asks for wait=true
        with self._lock:
            self.received.append(Received(ds, time.monotonic(), status, len(lines), gz, len(raw)))
            if status in (200, 422):
                kept = lines if status == 200 else lines[: len(lines) // 2]
                good = [x for x in kept if _is_object(x)]
                bad = len(kept) - len(good) + (reply.quarantine if status == 200 else 0)
                self.rows[ds].extend(good)
                self.quarantined[ds] += bad
        if status == 200:
            return self.answer(h, 200, {"successful_rows": len(lines) - bad, "quarantined_rows": bad})
        error = {413: "request body too large", 422: "materialized view failed", 429: "rate limit exceeded"}
        self.answer(h, status, {"error": error.get(status, f"error {status}")}, reply.headers, reply.body)

    def start_copy(self, h: BaseHTTPRequestHandler, pipe: str, mode: str) -> None:
        with self._lock:
            job = Job(str(next(self._ids)), pipe, mode, time.monotonic())
            self.jobs[job.id] = job
            self.max_open = max(self.max_open, len(self.jobs) - len(self._seen_final))
        self.answer(
            h, 200, {"id": job.id, "job_id": job.id, "job": {"id": job.id, "kind": "copy", "status": "waiting"}}
        )

    def job(self, h: BaseHTTPRequestHandler, job_id: str) -> None:
        with self._lock:
            self._advance()
            job = self.jobs.get(job_id)
            if job is not None and job.status in ("done", "error", "cancelled"):
                self._seen_final.add(job.id)
            doc = (
                None
                if job is None
                else {"id": job.id, "kind": "copy", "status": job.status, "pipe_name": job.pipe, "mode": job.mode}
            )
        if doc is None:
            return self.answer(h, 404, {"error": f"job {job_id} not found"})
        self.answer(h, 200, doc)

    def _advance(self) -> None:
        now = time.monotonic()
        for job in self.jobs.values():
            if job.status == "working" and now - (job.started or now) >= self.job_seconds:
                job.status = "error" if job.pipe in self.failing_pipes else "done"
        working = sum(j.status == "working" for j in self.jobs.values())
        for job in sorted(self.jobs.values(), key=lambda j: int(j.id)):
            if job.status == "waiting" and working < self.copy_concurrency:
                job.status, job.started = "working", now
                working += 1
        self.max_working = max(self.max_working, working)


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
