"""A logging filter that lets the first of a run of similar lines through and then at most one per interval.

librdkafka repeats itself while a broker is down (each connection attempt, each broker, each client: ~700 lines
in a 10 s outage). Lines are "similar" when they are equal once digits are masked (ports, counts and
milliseconds differ between attempts). A line let through after a quiet spell says how many similar lines
were held back since the last one shown.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

_DIGITS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic, keys: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._keys = keys
        self._seen: dict[tuple[str, int], tuple[float, int]] = {}  # key -> (last shown at, held back since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (_DIGITS.sub("#", record.getMessage()), record.levelno)
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            if len(self._seen) >= self._keys:  # bounded memory: forget the oldest half
                for k in sorted(self._seen, key=lambda k: self._seen[k][0])[: self._keys // 2]:
                    del self._seen[k]
            self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = f"{record.getMessage()} ({last[1]} similar lines held back in the last {now - last[0]:.0f}s)"
            record.args = None
        return True
