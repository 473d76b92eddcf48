"""Clocks the tests inject into the pipeline and the scheduler."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class FrozenClock:
    """Half a minute past an hour, forever: no scheduled slot (the first is :10) fires during a test, so the
    only rebuilds are the ones the test asks for. Sleeps are real but short."""

    def now(self) -> datetime:
        return datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.2))
