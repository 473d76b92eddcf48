"""bucketer: Sequin changes on Kafka -> cityHash64 buckets -> ClickHouse cleaned buckets."""

__version__ = "0.1.0"
