"""A change batch whose changes share the instant its key's stored version started.

On a warehouse that keeps whole seconds (ClickHouse 18.16) the next batch of a log entity often
changes a key within the second its last version started: the changes rewrite that stored
version in place (the last one wins), and a delete at that instant must still end it. Found by
tests/integration/extract/test_postgres_log.py (first load under concurrent writes), where a key
stayed live with its stored values after updates and a delete in one second.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from pipeline.snapshot.changes import diff_changes
from pipeline.snapshot.diff import Spec

T = datetime(2026, 3, 1, 0, 0, 5, tzinfo=UTC)
TS = pa.timestamp("us", "UTC")
STEP = 1_000_000  # whole seconds


def spec(hard_deletes: str) -> Spec:
    return Spec("items", ("id",), "check", ("name",), hard_deletes=hard_deletes, full_scan=False)


def current() -> pa.Table:
    """Key 1's stored version, opened by an earlier batch at T."""
    return pa.table(
        {
            "id": [1],
            "dbt_scd_id": ["stored"],
            "_hash": pa.array([2], pa.uint64()),
            "dbt_valid_from": pa.array([T], TS),
            "dbt_updated_at": pa.array([T], TS),
            "_opened_by": ["20260301T000004000000Z"],
        }
    )


def changes(ops: list[str]) -> pa.Table:
    return pa.table(
        {
            "id": [1] * len(ops),
            "_seq": pa.array(range(1, len(ops) + 1), pa.uint64()),
            "_op": ops,
            "_hash": pa.array([3 + i for i in range(len(ops))], pa.uint64()),
            "_time": pa.array([T] * len(ops), TS),
        }
    )


def test_updates_then_a_delete_at_the_stored_instant_end_the_stored_version() -> None:
    later = datetime(2026, 3, 1, 0, 0, 20, tzinfo=UTC)
    d = diff_changes(spec("invalidate"), current(), changes(["update", "update", "delete"]),
                     later, step_us=STEP)  # fmt: skip
    (row,) = d.opened.to_pylist()
    assert row["_replaces"] and row["_keep_scd_id"] == "stored" and row["_seq"] == 2
    assert row["dbt_valid_from"] == T and row["dbt_valid_to"] == datetime(
        2026, 3, 1, 0, 0, 6, tzinfo=UTC
    )
    assert d.closed.num_rows == 0


def test_updates_at_the_stored_instant_rewrite_it_once() -> None:
    later = datetime(2026, 3, 1, 0, 0, 20, tzinfo=UTC)
    d = diff_changes(
        spec("invalidate"), current(), changes(["update", "update"]), later, step_us=STEP
    )
    (row,) = d.opened.to_pylist()
    assert row["_replaces"] and row["_keep_scd_id"] == "stored" and row["_seq"] == 2
    assert row["dbt_valid_to"] is None
