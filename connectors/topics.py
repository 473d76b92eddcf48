"""Topic names of the contract (PIPELINE.md), with an optional prefix.

The prefix lets several pipelines (or test runs) share one cluster: with prefix ``t1.`` the source topic
is ``t1.activityRelations`` and bucket 3 is ``t1.activityRelations_bucket_3``. The default is no prefix,
which gives exactly the names of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "activityRelations"
REFERENCE_TABLES = ("members", "organizations", "repositories", "insightsProjects", "integrations")


@dataclass(frozen=True)
class TopicNames:
    prefix: str = ""

    @property
    def source(self) -> str:
        return f"{self.prefix}{SOURCE}"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}{SOURCE}_dlq"

    def bucket(self, n: int) -> str:
        return f"{self.prefix}{SOURCE}_bucket_{n}"

    def buckets(self, count: int) -> list[str]:
        return [self.bucket(n) for n in range(count)]

    def reference(self, table: str) -> str:
        if table not in REFERENCE_TABLES:
            raise ValueError(f"unknown reference table {table!r}; expected one of {', '.join(REFERENCE_TABLES)}")
        return f"{self.prefix}{table}"

    def references(self) -> dict[str, str]:
        return {t: self.reference(t) for t in REFERENCE_TABLES}

    def bucket_of_topic(self, topic: str) -> int | None:
        head = f"{self.prefix}{SOURCE}_bucket_"
        tail = topic[len(head) :]
        return int(tail) if topic.startswith(head) and tail.isdigit() else None
