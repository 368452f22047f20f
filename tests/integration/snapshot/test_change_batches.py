"""Change batches (log-based capture) through raw tables and the merge, on both warehouses.

Random sequences of inserts, updates and deletes per key, several per key in one batch, ties
at one instant, UPDATEs that change nothing, revivals; the snapshot view must equal the
independent oracle's history (tests/support/change_oracle.py), also after a crash in the
middle of a batch and its rerun.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import Entity
from pipeline.core.errors import FailpointError
from pipeline.load.raw import ensure_raw_table, with_check_hash
from pipeline.snapshot.apply import apply
from pipeline.snapshot.invariants import check_invariants
from pipeline.snapshot.storage import Names
from pipeline.state import ensure_tables, mark_done
from pipeline.warehouse import Warehouse, connect, quote_ident
from tests.support.change_oracle import ChangeOracle

BASE = datetime(2026, 3, 1, tzinfo=UTC)
EXAMPLES = int(os.environ.get("CHANGE_EXAMPLES", "10"))
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("name", pa.string()),
        ("score", pa.int64()),
        ("_op", pa.string()),
        ("_seq", pa.uint64()),
        ("_commit_ts", pa.timestamp("us", "UTC")),
    ]
)


@pytest.fixture(scope="module", params=["chdb", "clickhouse"])
def wh(request: pytest.FixtureRequest) -> Iterator[Warehouse]:
    if request.param == "chdb":
        url = request.getfixturevalue("stack_env")["CDC_WAREHOUSE_URL"]
    else:
        url = request.getfixturevalue("clickhouse").env["CDC_WAREHOUSE_URL"]
    warehouse = connect(url)
    yield warehouse
    warehouse.close()


@contextmanager
def scratch_database(wh: Warehouse) -> Iterator[str]:
    database = f"chg_{uuid.uuid4().hex[:12]}"
    ensure_tables(wh, database)
    try:
        yield database
    finally:
        wh.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")


def entity(hard_deletes: str, collapse: bool = False) -> Entity:
    return Entity(
        name="items",
        source="postgres",
        object_name="public.items",
        unique_key=("id",),
        strategy="check",
        check_cols=("name", "score"),
        hard_deletes=hard_deletes,
        mode="log",
        collapse=collapse,
    )


def batch_id(at: datetime) -> str:
    return at.strftime("%Y%m%dT%H%M%S%fZ")


def load(
    wh: Warehouse, database: str, e: Entity, batch: str, changes: list[dict[str, Any]]
) -> None:
    """Stage a change batch in raw as the load does (hashes, meta columns)."""
    if not wh.table_exists(database, e.raw_table):
        ensure_raw_table(wh, database, e, SCHEMA)
    rows = [
        {
            "id": c["id"],
            "name": c.get("name"),
            "score": c.get("score"),
            "_op": c["op"],
            "_seq": seq,
            "_commit_ts": c["time"],
        }
        for seq, c in enumerate(changes, start=1)
    ]
    table = with_check_hash(pa.Table.from_pylist(rows, schema=SCHEMA), e)
    n = table.num_rows
    table = (
        table.append_column("_batch_id", pa.array([batch] * n, pa.string()))
        .append_column("_loaded_at", pa.array([BASE] * n, pa.timestamp("us", "UTC")))
        .append_column("_row_hash", pa.array([0] * n, pa.uint64()))
    )
    wh.insert_arrow(database, e.raw_table, table)


def view(wh: Warehouse, database: str, e: Entity) -> list[tuple[Any, ...]]:
    deleted = "dbt_is_deleted = 'True'" if e.hard_deletes == "new_record" else "0"
    rows = wh.query_rows(
        f"SELECT id, name, score, dbt_valid_from, dbt_valid_to, {deleted}"
        f" FROM {quote_ident(database)}.items_snapshot ORDER BY id, dbt_valid_from"
    )
    return [(i, n, s, f, t, bool(d)) for i, n, s, f, t, d in rows]


# per batch: a list of changes; each change (key, op, value, tick) with ticks of whole seconds
# (ClickHouse 18.16 keeps whole seconds) and ties at one tick
CHANGE = st.tuples(
    st.integers(1, 4),
    st.sampled_from(["insert", "update", "update", "delete"]),
    st.sampled_from(["a", "b"]),
    st.integers(0, 2),
)
BATCHES = st.lists(st.lists(CHANGE, min_size=1, max_size=10), min_size=1, max_size=3)


def timed(
    batches: list[list[tuple[int, str, str, int]]],
) -> list[tuple[datetime, list[dict[str, Any]]]]:
    """Batch times and changes with commit times: later batches, later ticks."""
    out, clock = [], BASE
    for batch in batches:
        changes = []
        start = clock
        for key, op, value, tick in sorted(batch, key=lambda c: c[3]):
            at = start + timedelta(seconds=1 + tick)
            changes.append({"id": key, "op": op, "name": value, "score": len(value), "time": at})
            clock = max(clock, at)
        clock += timedelta(seconds=10)
        out.append((clock, changes))
    return out


def run(
    wh: Warehouse,
    database: str,
    e: Entity,
    batches: list[tuple[datetime, list[dict[str, Any]]]],
    crash: bool = False,
) -> ChangeOracle:
    oracle = ChangeOracle(("name", "score"), e.hard_deletes, e.collapse)
    for at, changes in batches:
        batch = batch_id(at)
        load(wh, database, e, batch, changes)
        if crash:
            with mock.patch.dict(os.environ, {"CDC_FAILPOINT": "snapshot-after-open"}):
                try:
                    apply(wh, database, e, batch)
                except FailpointError:
                    pass
        result = apply(wh, database, e, batch)
        mark_done(wh, database, e.name, "snapshot", batch, result)
        oracle.apply(changes, at)
    return oracle


@pytest.mark.parametrize("hard_deletes", ["ignore", "invalidate", "new_record"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(batches=BATCHES, crash=st.booleans())
def test_change_history_matches_oracle(
    wh: Warehouse, hard_deletes: str, batches: list[list[tuple[int, str, str, int]]], crash: bool
) -> None:
    e = entity(hard_deletes)
    with scratch_database(wh) as database:
        oracle = run(wh, database, e, timed(batches), crash)
        got = view(wh, database, e)
        assert check_invariants(wh, Names.of(database, e), e) == []
    want = [(k, n, s, f, t, d) for k, n, s, f, t, d in oracle.history()]
    assert got == want


def test_collapse_keeps_one_state_per_key_and_batch(wh: Warehouse) -> None:
    e = entity("invalidate", collapse=True)
    at = BASE + timedelta(seconds=30)
    changes = [
        {"id": 1, "op": "insert", "name": "a", "score": 1, "time": BASE + timedelta(seconds=1)},
        {"id": 1, "op": "update", "name": "b", "score": 1, "time": BASE + timedelta(seconds=2)},
        {"id": 1, "op": "update", "name": "c", "score": 1, "time": BASE + timedelta(seconds=3)},
        {"id": 2, "op": "insert", "name": "x", "score": 2, "time": BASE + timedelta(seconds=4)},
        {"id": 2, "op": "delete", "time": BASE + timedelta(seconds=5)},
    ]
    with scratch_database(wh) as database:
        oracle = run(wh, database, e, [(at, changes)])
        got = view(wh, database, e)
    assert [(r[0], r[1]) for r in got] == [(1, "c")]
    assert got == [tuple(r) for r in oracle.history()]


def stored_rows(wh: Warehouse, database: str, e: Entity) -> list[tuple[Any, ...]]:
    """Storage as FINAL reads it, every column but the write's `_version`."""
    storage = Names.of(database, e).q_storage
    table = wh.query_arrow(f"SELECT * FROM {storage} FINAL").drop_columns(["_version"])
    return sorted(tuple(map(str, row.values())) for row in table.to_pylist())


@pytest.mark.parametrize("hard_deletes", ["ignore", "invalidate", "new_record"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(batches=BATCHES)
def test_versions_written_from_arrow_equal_the_parked_ones(
    wh: Warehouse, hard_deletes: str, batches: list[list[tuple[int, str, str, int]]]
) -> None:
    """chDB writes a change batch's versions straight from Arrow; a warehouse that cannot
    read Arrow in SQL parks them and copies them by SQL: both give the same rows, ids too."""
    if not wh.reads_arrow_in_sql:
        pytest.skip("this warehouse only parks")
    e = entity(hard_deletes)
    with scratch_database(wh) as direct:
        run(wh, direct, e, timed(batches))
        want = stored_rows(wh, direct, e)
    with (
        mock.patch.object(type(wh), "reads_arrow_in_sql", False),
        scratch_database(wh) as parked,
    ):
        run(wh, parked, e, timed(batches))
        got = stored_rows(wh, parked, e)
    assert got == want
