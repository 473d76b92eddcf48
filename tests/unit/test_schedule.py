"""The staggered hourly schedule under a fake clock: each bucket at its minute, once an hour, no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from stream.schedule import ScheduleConfig, Scheduler, due, latest_slot, next_slot

T0 = datetime(2026, 11, 23, 23, 0, 0, tzinfo=UTC)


class FakeClock:
    """Time that moves only when slept on (or when the test moves it)."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "a scheduler must never busy-loop"
        self.slept.append(seconds)
        self.t += timedelta(seconds=seconds)


def test_default_pattern_pairs_four_minutes_apart_from_ten() -> None:
    cfg = ScheduleConfig(buckets=10)
    assert [cfg.minute(b) for b in range(10)] == [10, 10, 14, 14, 18, 18, 22, 22, 26, 26]


def test_pattern_continues_and_wraps_past_the_hour() -> None:
    cfg = ScheduleConfig(buckets=50)
    for b in range(50):
        assert cfg.offset(b) == 10 + 4 * (b // 2)
        assert cfg.minute(b) == (10 + 4 * (b // 2)) % 60
    assert cfg.minute(24) == 58  # offset 58: the last group before the wrap
    assert cfg.minute(26) == 2  # offset 62 wraps to :02
    assert cfg.minute(49) == (10 + 4 * 24) % 60


def test_parse_and_explicit_minutes() -> None:
    cfg = ScheduleConfig.parse("5/3/1", buckets=4)
    assert [cfg.minute(b) for b in range(4)] == [5, 8, 11, 14]
    pinned = ScheduleConfig(buckets=4, minutes={3: 59})
    assert [pinned.minute(b) for b in range(4)] == [10, 10, 14, 59]
    with pytest.raises(ValueError):
        ScheduleConfig.parse("every hour", buckets=4)
    with pytest.raises(ValueError):
        ScheduleConfig(buckets=4, minutes={1: 60})
    with pytest.raises(ValueError):
        cfg.minute(4)


def test_slots_around_the_minute() -> None:
    cfg = ScheduleConfig(buckets=10)
    at = T0 + timedelta(minutes=14)
    assert latest_slot(2, at, cfg) == at
    assert latest_slot(2, at - timedelta(seconds=1), cfg) == at - timedelta(hours=1)
    assert next_slot(2, at, cfg) == at + timedelta(hours=1)


def test_due_is_pure_and_fires_a_missed_slot_once() -> None:
    cfg = ScheduleConfig(buckets=4)
    last = {b: latest_slot(b, T0, cfg) for b in range(4)}  # everything done as of 23:00
    assert due(T0 + timedelta(minutes=9, seconds=59), last, cfg) == []
    assert due(T0 + timedelta(minutes=10), last, cfg) == [0, 1]
    assert due(T0 + timedelta(minutes=14), last, cfg) == [0, 1, 2, 3]
    # Three hours asleep: each bucket is due once, not three times.
    assert due(T0 + timedelta(hours=3), last, cfg) == [0, 1, 2, 3]
    assert due(T0, {}, cfg) == [0, 1, 2, 3]  # never run: due at once
    assert last == {b: latest_slot(b, T0, cfg) for b in range(4)}  # not mutated


def test_driven_minute_by_minute_each_bucket_fires_at_its_minute_once_per_hour() -> None:
    cfg = ScheduleConfig(buckets=10)
    clock = FakeClock(T0 + timedelta(minutes=1))
    calls: list[tuple[datetime, list[int]]] = []
    s = Scheduler(cfg, lambda bs: calls.append((clock.now(), bs)), clock=clock)
    s.start_at(clock.now())
    for _ in range(3 * 60 * 4):  # three hours in 15-second steps
        s.run_once()
        clock.t += timedelta(seconds=15)
    fires: dict[int, list[datetime]] = {b: [] for b in range(10)}
    for at, bs in calls:
        for b in bs:
            fires[b].append(at)
    for b in range(10):
        minute = 10 + 4 * (b // 2)
        expected = [T0 + timedelta(hours=h, minutes=minute) for h in range(3)]
        assert fires[b] == expected, b


def test_run_sleeps_on_the_clock_until_stopped() -> None:
    cfg = ScheduleConfig(buckets=6)
    clock = FakeClock(T0 + timedelta(minutes=30))
    s: Scheduler
    calls: list[tuple[datetime, list[int]]] = []

    def rebuild(bs: list[int]) -> None:
        calls.append((clock.now(), list(bs)))
        clock.t += timedelta(seconds=40)  # a rebuild takes time
        if len(calls) == 6:
            s.stop()

    s = Scheduler(cfg, rebuild, clock=clock, tick=60.0)
    s.run()
    assert s.stopped
    assert [bs for _, bs in calls] == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5]]
    # Started at :30, so the first run is at the next hour's :10; then once an hour.
    assert [at.replace(second=0) for at, _ in calls] == [
        T0 + timedelta(hours=h, minutes=m) for h in (1, 2) for m in (10, 14, 18)
    ]
    # Fired within one tick of the slot, never before it.
    for at, bs in calls:
        slot = latest_slot(bs[0], at, cfg)
        assert timedelta(0) <= at - slot < timedelta(seconds=60)
    assert max(clock.slept) <= 60.0


def test_a_failing_rebuild_does_not_stop_the_schedule() -> None:
    cfg = ScheduleConfig(buckets=2)
    clock = FakeClock(T0)
    attempts: list[list[int]] = []

    def rebuild(bs: list[int]) -> None:
        attempts.append(bs)
        raise RuntimeError("warehouse down")

    s = Scheduler(cfg, rebuild, clock=clock)
    s.start_at(clock.now())
    clock.t = T0 + timedelta(minutes=10)
    assert s.run_once() == [0, 1]
    assert s.run_once() == []  # not retried in a loop
    clock.t = T0 + timedelta(hours=1, minutes=10)
    assert s.run_once() == [0, 1]
    assert attempts == [[0, 1], [0, 1]]


def test_run_missed_on_start_catches_up_this_hours_passed_slots_only() -> None:
    cfg = ScheduleConfig(buckets=10)
    clock = FakeClock(T0 + timedelta(minutes=20))
    s = Scheduler(cfg, lambda bs: None, clock=clock, run_missed_on_start=True)
    s.start_at(clock.now())
    assert s.run_once() == [0, 1, 2, 3, 4, 5]  # :10, :14, :18 have passed this hour
    plain = Scheduler(cfg, lambda bs: None, clock=clock)
    plain.start_at(clock.now())
    assert plain.run_once() == []
