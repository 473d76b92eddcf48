"""Fakes shared by the unit tests that run workers without a broker.

``FakeMessage`` stands for a ``confluent_kafka.Message`` as the router, the loader and the decoder read it
(topic, partition, offset, key, value, error). The fake consumers, sinks and warehouses stay with their tests:
each scripts a different behaviour (a partitioned log, a scripted outage, refused commits), so they are not
copies of one thing."""

from __future__ import annotations

from confluent_kafka import KafkaError


class FakeMessage:
    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        key: bytes | None = b"k",
        error: KafkaError | None = None,
    ) -> None:
        self._t, self._p, self._o, self._v, self._k, self._err = topic, partition, offset, value, key, error

    @classmethod
    def failed(cls, err: KafkaError) -> FakeMessage:
        """What ``consume`` returns for a consumer error: no topic, partition or offset, no value."""
        return cls("", -1, -1, None, error=err)

    def error(self) -> KafkaError | None:
        return self._err

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v
