"""Key buckets: split a table's keys into groups by a hash of their text, the same on every
table, so a job over a large table holds one group at a time whatever the table size."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.warehouse.sql import ints, key_fingerprint


@dataclass(frozen=True)
class Buckets:
    """`count` groups of `keys`; one bucket (the usual case) adds no condition at all."""

    count: int
    keys: tuple[str, ...]

    @classmethod
    def sized(cls, rows: int, bucket_rows: int, keys: tuple[str, ...]) -> Buckets:
        """About `bucket_rows` keys per bucket, never twice that: a table below twice the size
        stays one bucket (each extra bucket re-reads the batch and the current versions)."""
        return cls(max(1, rows // max(bucket_rows, 1)), keys)

    @property
    def of_key(self) -> str:
        """The bucket of a row's key, in SQL."""
        return f"modulo({key_fingerprint(self.keys)}, {self.count})"

    def where(self, bucket: int) -> str:
        """A SQL condition that keeps the keys of `bucket`."""
        if self.count == 1:
            return "1"
        return self.where_any([bucket])

    def where_any(self, buckets: list[int]) -> str:
        """A SQL condition that keeps the keys of any of `buckets`."""
        if self.count == 1 or len(buckets) == self.count:
            return "1"
        return f"{self.of_key} IN ({ints(buckets)})"
