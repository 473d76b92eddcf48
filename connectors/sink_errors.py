"""The errors of the router's ``Sink`` seam (stream/sinks.py), for sinks that are not Kafka.

They live here, not in stream/, because a sink's implementation in connectors/ (connectors/tinybird.py)
raises them and connectors/ never imports stream/. The router handles them itself:

- ``SinkRetryError``: this batch is not durable, the sink still is usable: the router aborts the batch,
  rewinds the consumer to the committed offsets and replays it after a capped exponential backoff (the
  same path as a retriable Kafka error). Raised as well when a stop interrupted the wait.
- ``SinkFatalError``: the sink stopped for good (configuration error, partial write, target unreachable
  past its deadline): the router stops at once with this one-line reason; the batch in hand stays
  uncommitted, so a restart replays it.

Kafka's own errors (connectors/kafka.py, e.g. those of the DLQ producer or the offset commit) keep their
types: a sink never dresses one as the other.
"""

from __future__ import annotations


class SinkError(RuntimeError):
    """Base of the sink errors; ``str()`` is a one-line reason."""


class SinkRetryError(SinkError):
    """The batch was not made durable; abort it and replay it (the sink stays open)."""


class SinkFatalError(SinkError):
    """The sink is stopped for good: the router stops with this reason, nothing past the last
    acknowledged batch committed."""
