"""Shared helpers for every benchmark in ``bench/``.

- ``broker()``: a context manager giving a Kafka bootstrap. ``$BENCH_BOOTSTRAP`` reuses a running broker;
  otherwise a ``LocalKafka`` is started on free ports in a temporary directory and removed afterwards.
- ``repeat(fn, n)`` / ``median()`` / ``spread()``: repeat-and-median.
- ``PeakRss``: peak resident memory of a process **and its children** (psutil polling in a thread),
  and their CPU seconds, for workers run as subprocesses.
- ``messages(count, seed)``: ~1.3 KB Sequin ``activityRelations`` messages (key, value). From
  ``stream.loadgen`` (bad input and updates included) when importable, else a seeded fallback here.
- Re-exported from ``bench/report.py``: ``machine()``, ``Report`` and the result-file helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil

from bench.report import (  # noqa: F401 - the one import line for benchmarks
    BENCH_DIR,
    REPO,
    RESULTS_JSON,
    RESULTS_MD,
    WORK_DIR,
    Report,
    command_line,
    load_results,
    machine,
    machine_line,
    median,
    replace_entry,
    replace_section,
    spread,
    utc_now,
)

T = TypeVar("T")


# -- repeat and median ----------------------------------------------------------------------------------
def repeat(fn: Callable[[], T], n: int) -> list[T]:
    return [fn() for _ in range(n)]


# -- the broker -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def broker(heap: str = "1g") -> Iterator[str]:
    """A Kafka bootstrap: ``$BENCH_BOOTSTRAP`` if set, else a fresh LocalKafka stopped and removed after."""
    existing = os.environ.get("BENCH_BOOTSTRAP")
    if existing:
        yield existing
        return
    from bucketer.localkafka import LocalKafka, free_port

    directory = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    port = free_port()
    controller = free_port()
    while controller == port:
        controller = free_port()
    kafka = LocalKafka(directory, port=port, controller_port=controller, heap=heap)
    # The broker runs in its own session: a SIGTERM to this benchmark must still stop it (via finally).
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield kafka.start()
    finally:
        kafka.stop()
        shutil.rmtree(directory, ignore_errors=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def unique_prefix(tag: str) -> str:
    """A fresh topic prefix, so runs on a shared broker never see each other's topics or groups."""
    return f"bench.{tag}.{uuid.uuid4().hex[:8]}."


# -- memory and CPU of a subprocess -----------------------------------------------------------------------
class PeakRss:
    """Polls a process tree's RSS (and CPU seconds) in a background thread until ``stop()``."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_bytes = 0
        self._cpu: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name=f"peak-rss-{pid}")

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def cpu_seconds(self) -> float:
        """User+system CPU of the tree so far (exited children keep their last reading)."""
        self.sample()
        return sum(self._cpu.values())

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
        self.peak_bytes = max(self.peak_bytes, rss)

    def _poll(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)


# -- messages --------------------------------------------------------------------------------------------
def messages(count: int, seed: int = 1) -> list[tuple[bytes, bytes | None]]:
    """``count`` (key, value) Sequin messages for ``activityRelations``, the same for the same seed."""
    try:
        from stream.loadgen import LoadgenConfig, generate
    except ImportError:
        return list(fallback_messages(count, seed))
    return [(g.key, g.value) for g in generate(LoadgenConfig(count=count, seed=seed)) if g.topic == "activityRelations"]


def fallback_messages(count: int, seed: int = 1) -> Iterator[tuple[bytes, bytes]]:
    """Seeded ~1 KB Sequin activity inserts (used only when ``stream.loadgen`` is not importable)."""
    rng = random.Random(seed)
    segments = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(60)]
    platforms = ("github", "git", "gitlab", "gerrit", "slack", "discord", "jira")
    for i in range(count):
        aid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        moment = f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00.{i % 999999:06d}Z"
        record = {
            "activityId": aid,
            "segmentId": rng.choice(segments),
            "memberId": str(uuid.UUID(int=rng.getrandbits(128))),
            "organizationId": str(uuid.UUID(int=rng.getrandbits(128))),
            "platform": rng.choice(platforms),
            "type": "authored-commit",
            "channel": f"https://github.com/acme/repo-{rng.randrange(500)}",
            "sourceId": f"{rng.getrandbits(160):040x}",
            "sourceParentId": "",
            "timestamp": moment,
            "createdAt": moment,
            "updatedAt": moment,
            "gitInsertions": rng.randrange(500),
            "gitDeletions": rng.randrange(200),
            "score": 2,
            "isContribution": True,
            "sentimentScore": None,
            "username": f"dev{rng.randrange(10_000)}",
            "objectMemberId": None,
            "objectMemberUsername": "",
            "pullRequestReviewState": "",
            "url": f"https://github.com/acme/repo/commit/{rng.getrandbits(64):016x}",
            "conversationId": None,
            "isBotActivity": False,
            "isTeamMemberActivity": False,
        }
        doc = {
            "action": "insert",
            "changes": None,
            "record": record,
            "metadata": {
                "table_schema": "public",
                "table_name": "activityRelations",
                "commit_timestamp": moment,
                "commit_lsn": 1000 + i,
                "commit_idx": 0,
                "idempotency_key": uuid.UUID(int=rng.getrandbits(128)).hex,
                "record_pks": [aid],
            },
        }
        yield aid.encode(), json.dumps(doc, separators=(",", ":")).encode()
