"""Running the cleaning copy pipes on demand (``bucketer tinybird copy``).

Contract: ``CopyRunner(client, max_concurrent=12).run(buckets)`` starts the copy pipe
``activityRelations_deduplicated_cleaned_bucket_{n}`` of each bucket (``_mode=replace``) through the API and
polls each job (``GET /v0/jobs/{id}``) until ``done``, ``error`` or ``cancelled``; never more than
``max_concurrent`` jobs are started and unfinished at once (the production account runs 12 at a time).
A bucket whose start or polling fails is reported with its error; the others go on. Time is injected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from connectors.tinybird_api import TinybirdClient, TinybirdError, TinybirdRetryable
from stream.tinybird_project import cleaning_pipe_name

log = logging.getLogger("bucketer.tinybird.copy")
FINAL = ("done", "error", "cancelled")
T = TypeVar("T")


@dataclass(frozen=True)
class CopyResult:
    bucket: int
    pipe: str
    job_id: str | None
    status: str  # done | error | cancelled | failed (could not start/poll) | timeout
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"


class CopyRunner:
    def __init__(
        self,
        client: TinybirdClient,
        max_concurrent: int = 12,
        poll_interval: float = 2.0,
        timeout: float = 3600.0,
        mode: str = "replace",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_result: Callable[[CopyResult], None] | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.client, self.max_concurrent, self.poll_interval = client, max_concurrent, poll_interval
        self.timeout, self.mode, self.clock, self.sleep = timeout, mode, clock, sleep
        self.on_result = on_result

    def run(self, buckets: list[int]) -> list[CopyResult]:
        with ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="tinybird-copy") as pool:
            return list(pool.map(self._one, buckets))

    def _one(self, bucket: int) -> CopyResult:
        pipe = cleaning_pipe_name(bucket)
        start = self.clock()
        job_id: str | None = None
        try:
            job_id = self._retrying(start, lambda: self.client.start_copy(pipe, self.mode))
            log.info("bucket %d: copy job %s started (%s)", bucket, job_id, pipe)
            while True:
                job = self._retrying(start, lambda: self.client.job(job_id))
                status = str(job.get("status", ""))
                if status in FINAL:
                    detail = str(job.get("error") or "")
                    result = CopyResult(bucket, pipe, job_id, status, detail, self.clock() - start)
                    break
                if self.clock() - start > self.timeout:
                    result = CopyResult(
                        bucket, pipe, job_id, "timeout", f"still {status} after {self.timeout}s", self.clock() - start
                    )
                    break
                self.sleep(self.poll_interval)
        except TinybirdError as exc:
            result = CopyResult(bucket, pipe, job_id, "failed", str(exc), self.clock() - start)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def _retrying(self, start: float, call: Callable[[], T]) -> T:
        """429/5xx/timeouts: wait (Retry-After when given) and try again, until the job's timeout."""
        while True:
            try:
                return call()
            except TinybirdRetryable as exc:
                if self.clock() - start > self.timeout:
                    raise
                log.warning("%s; retrying", exc)
                self.sleep(exc.delay if exc.delay is not None else self.poll_interval)
