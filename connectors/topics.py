"""Topic names of the contract (PIPELINE.md), with an optional prefix.

The prefix lets several pipelines (or test runs) share one cluster: with prefix ``t1.`` the source topic
is ``t1.activityRelations`` and bucket 3 is ``t1.activityRelations_bucket_3``. The default is no prefix,
which gives exactly the names of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

from connectors.model import REFERENCE_COLUMNS

SOURCE = "activityRelations"
# Bucket topics share this many partitions in all by default. A router transaction writes to every bucket
# partition it routes to, and its cost (one commit marker per partition, smaller per-partition batches) grows
# with that count: measured on the local broker (bench/RESULTS.md), 100 topics x 3 partitions ran at 0.58x the
# messages/s of 10 x 3, while 100 x 1 ran at 1.2x. Keeping the total fixed keeps the cost flat as N grows.
BUCKET_PARTITION_BUDGET = 30
OTHER_PARTITIONS = 3  # the source, reference and DLQ topics when this project creates them
REFERENCE_TABLES = tuple(REFERENCE_COLUMNS)  # members, organizations, repositories, insightsProjects, integrations


def bucket_partitions(buckets: int, partitions: int | None = None) -> int:
    """Partitions per bucket topic: ``partitions`` when given, else ceil(BUCKET_PARTITION_BUDGET / buckets)
    (10 buckets: 3, 20: 2, 30 and more: 1). One key always stays on one partition of its bucket topic."""
    if partitions is not None:
        return partitions
    return max(1, -(-BUCKET_PARTITION_BUDGET // max(1, buckets)))


@dataclass(frozen=True)
class TopicNames:
    prefix: str = ""

    @property
    def source(self) -> str:
        return f"{self.prefix}{SOURCE}"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}{SOURCE}_dlq"

    @property
    def resolve(self) -> str:
        """Activity changes the loader resolves by activityId against the warehouse (stream/cdc.py): deletes
        holding only the primary key (no segmentId to bucket them by) and updates without old values."""
        return f"{self.prefix}{SOURCE}_resolve"

    @property
    def control(self) -> str:
        """Compacted; the router's switch records of a gradual rebucket (stream/migration.py)."""
        return f"{self.prefix}bucketer_control"

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
