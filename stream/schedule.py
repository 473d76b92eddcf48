"""The enrichment schedule: every bucket once an hour, in groups staggered a few minutes apart.

The pattern (CLEANED_BUCKETS.md): bucket ``b`` fires at minute ``first + step * (b // group)`` of every hour,
UTC; with the defaults (10, 4, 2) buckets 0-1 at :10, 2-3 at :14, 4-5 at :18, 6-7 at :22, 8-9 at :26,
10-11 at :30, ... For large N the offset passes :59 and **wraps** (minute ``offset % 60``): with N = 50,
buckets 26-27 fire at :02 (offset 62), 28-29 at :06, ... Wrapped groups share minutes with earlier ones;
each bucket still fires exactly once an hour, and the rebuild runner bounds how many run at once
(``parallel``) and never runs one bucket twice at once. ``ScheduleConfig.minutes`` pins explicit minutes for
chosen buckets (a cron-like override); ``ScheduleConfig.parse`` reads "first/step/group", e.g. "10/4/2".

``due(now, last_run, config)`` is pure: the buckets whose latest slot at or before ``now`` is later than
their last run (a missing entry means "never run": due at once). Missing several slots (a long rebuild,
a sleeping laptop) gives ONE catch-up run, never a burst.

``Scheduler(config, run_buckets, clock)``: ``run()`` loops until ``stop()``: asks ``due``, records the slot as
run, calls ``run_buckets(buckets)`` (which may fail: logged, retried at the next slot), then sleeps on the
injected clock until the next slot (at most ``tick`` seconds, so ``stop()`` is seen quickly). By default it
starts with every bucket's current slot counted as done (cron semantics: the first run is at the next
slot); ``run_missed_on_start=True`` rebuilds the buckets whose slot this hour has passed at once.
Time is a ``Clock`` (``now()`` aware UTC, ``sleep(seconds)``): tests pass a fake one and never sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from connectors.model import FIRST_MINUTE, GROUP_SIZE, STEP_MINUTES, slot_offset

log = logging.getLogger("bucketer.schedule")

HOUR = timedelta(hours=1)


class Clock(Protocol):
    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall-clock UTC time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


@dataclass(frozen=True)
class ScheduleConfig:
    buckets: int = 10
    first_minute: int = FIRST_MINUTE
    step_minutes: int = STEP_MINUTES
    group_size: int = GROUP_SIZE
    minutes: Mapping[int, int] = field(default_factory=dict)  # explicit minute (0-59) for chosen buckets

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.group_size < 1 or self.step_minutes < 0 or self.first_minute < 0:
            raise ValueError(f"invalid schedule {self}")
        bad = {b: m for b, m in self.minutes.items() if not (0 <= m < 60 and 0 <= b < self.buckets)}
        if bad:
            raise ValueError(f"explicit minutes must be 0-59 for buckets 0-{self.buckets - 1}: {bad}")

    @classmethod
    def parse(cls, spec: str, buckets: int) -> ScheduleConfig:
        """ "first/step/group" (e.g. "10/4/2", the default pattern) for ``buckets`` buckets."""
        try:
            first, step, group = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"schedule must be FIRST/STEP/GROUP minutes, e.g. 10/4/2; got {spec!r}") from None
        return cls(buckets=buckets, first_minute=first, step_minutes=step, group_size=group)

    def offset(self, bucket: int) -> int:
        """Minutes after the hour before wrapping (may exceed 59 for large N)."""
        if not 0 <= bucket < self.buckets:
            raise ValueError(f"bucket {bucket} is not in 0..{self.buckets - 1}")
        if bucket in self.minutes:
            return self.minutes[bucket]
        return slot_offset(bucket, self.first_minute, self.step_minutes, self.group_size)

    def minute(self, bucket: int) -> int:
        """The minute of every hour at which ``bucket`` fires (0-59)."""
        return self.offset(bucket) % 60


def latest_slot(bucket: int, now: datetime, config: ScheduleConfig) -> datetime:
    """The most recent time at or before ``now`` at which ``bucket`` was scheduled."""
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    slot = hour + timedelta(minutes=config.minute(bucket))
    return slot if slot <= now else slot - HOUR


def next_slot(bucket: int, now: datetime, config: ScheduleConfig) -> datetime:
    """The first time strictly after ``now`` at which ``bucket`` is scheduled."""
    return latest_slot(bucket, now, config) + HOUR


def due(now: datetime, last_run: Mapping[int, datetime], config: ScheduleConfig) -> list[int]:
    """Buckets to rebuild at ``now``: their latest slot is later than their last run (or they never ran)."""
    out = []
    for b in range(config.buckets):
        prev = last_run.get(b)
        if prev is None or prev < latest_slot(b, now, config):
            out.append(b)
    return out


class Scheduler:
    """Fires due rebuilds on the staggered hourly pattern. ``run()`` loops; ``stop()`` only sets a flag."""

    def __init__(
        self,
        config: ScheduleConfig,
        run_buckets: Callable[[list[int]], Any],
        clock: Clock | None = None,
        tick: float = 5.0,
        run_missed_on_start: bool = False,
    ) -> None:
        self.config = config
        self._run_buckets = run_buckets
        self._clock = clock or SystemClock()
        self._tick = tick
        self._run_missed = run_missed_on_start
        self._stop = threading.Event()
        self.last_run: dict[int, datetime] = {}
        self.fired: list[tuple[datetime, list[int]]] = []  # (slot time of the first bucket, buckets)

    def start_at(self, now: datetime) -> None:
        """The starting state: each bucket's latest slot counts as done; with ``run_missed_on_start``, the
        slots passed in the current hour do not (those buckets are due at once)."""
        hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        self.last_run = {}
        for b in range(self.config.buckets):
            slot = latest_slot(b, now, self.config)
            if not (self._run_missed and slot >= hour):
                self.last_run[b] = slot

    def run_once(self) -> list[int]:
        """Fire whatever is due now; returns the buckets fired."""
        now = self._clock.now()
        buckets = due(now, self.last_run, self.config)
        if not buckets:
            return []
        for b in buckets:
            self.last_run[b] = latest_slot(b, now, self.config)
        self.fired.append((now, buckets))
        log.info("schedule: rebuilding buckets %s at %s", buckets, now.isoformat())
        try:
            self._run_buckets(buckets)
        except Exception:
            log.exception("schedule: rebuild of buckets %s failed; next attempt at their next slot", buckets)
        return buckets

    def seconds_to_next(self, now: datetime) -> float:
        nxt = min(next_slot(b, now, self.config) for b in range(self.config.buckets))
        return max(0.0, (nxt - now).total_seconds())

    def run(self) -> None:
        self.start_at(self._clock.now())
        while not self._stop.is_set():
            self.run_once()
            if self._stop.is_set():
                break
            self._clock.sleep(min(self._tick, self.seconds_to_next(self._clock.now())) or 0.001)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def minutes_table(config: ScheduleConfig, buckets: Iterable[int] | None = None) -> dict[int, int]:
    """bucket -> minute of the hour, for display."""
    return {b: config.minute(b) for b in (range(config.buckets) if buckets is None else buckets)}
