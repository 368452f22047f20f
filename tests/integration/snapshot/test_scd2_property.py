"""The SCD2 engine against an independent oracle (tests/support/scd2_oracle.py) on real warehouses.

Hypothesis drives random sequences of source states (inserts, updates to checked and unchecked
columns, NULLs, deletes, revivals: tests/support/scd2_scenarios.py; optional crashes between
opening and closing versions) through raw tables and `apply_batch` on chDB and on the ClickHouse
server, for every strategy and every hard_deletes mode, and compares the snapshot view with the
oracle's history. The pure diff against the same oracle: tests/unit/snapshot/test_diff.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any
from unittest import mock

import pyarrow as pa
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pipeline.config import Entity
from pipeline.core.errors import DeleteGuardError, FailpointError
from pipeline.load.raw import ensure_raw_table, with_check_hash
from pipeline.load.rehash import ensure_current_hashes
from pipeline.snapshot.invariants import BUCKET_ROWS, check_invariants
from pipeline.snapshot.merge import apply_batch
from pipeline.snapshot.storage import Names
from pipeline.state import ensure_tables, mark_done
from pipeline.warehouse import Warehouse, connect, quote_ident
from tests.support.scd2_scenarios import (
    BASE,
    CONFIGS,
    HARD_DELETES,
    MICROSECOND,
    SECOND,
    STEPS,
    Step,
    as_versions,
    assert_history,
    batch_id,
    make_entity,
    oracle_for,
    schema_for,
    source_states,
)

# examples per strategy x hard_deletes x warehouse: the default keeps the file under ~2 min on
# 2 cores (every batch costs ~25 warehouse queries); SCD2_EXAMPLES=100 for a deep run
# (10: the diff's semantics get 60 examples per strategy x hard_deletes x scan in
# tests/unit/snapshot/test_diff.py; these check the warehouse's side of the same oracle)
EXAMPLES = int(os.environ.get("SCD2_EXAMPLES", "10"))
# one bucket per merge, or one bucket per key
BUCKET_SIZES = st.sampled_from([BUCKET_ROWS, BUCKET_ROWS, 1])


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
    """A database no other example uses; dropped afterwards."""
    database = f"scd2p_{uuid.uuid4().hex[:12]}"
    ensure_tables(wh, database)
    try:
        yield database
    finally:
        wh.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")


# --- driving the engine ----------------------------------------------------------------------


def time_unit(wh: Warehouse) -> timedelta:
    """chDB keeps microseconds (DateTime64): use them; ClickHouse 18.16 keeps whole seconds."""
    return MICROSECOND if wh.features.datetime64 else SECOND


def load_raw(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch: str,
    rows: list[dict[str, Any]],
    hashed: bool = True,
) -> None:
    """Insert an extract into raw; `hashed=False` leaves the change hashes out, like rows loaded
    before the load stored them, so the snapshot must rehash the batch first."""
    schema = schema_for(entity)
    if not wh.table_exists(database, entity.raw_table):
        ensure_raw_table(wh, database, entity, schema)
    table = pa.Table.from_pylist(rows, schema=schema)
    if hashed:
        table = with_check_hash(table, entity)
    n = table.num_rows
    table = (
        table.append_column("_batch_id", pa.array([batch] * n, pa.string()))
        .append_column("_loaded_at", pa.array([BASE] * n, pa.timestamp("us", "UTC")))
        .append_column("_row_hash", pa.array([0] * n, pa.uint64()))
    )
    wh.insert_arrow(database, entity.raw_table, table)


@contextmanager
def failpoint(name: str) -> Iterator[None]:
    with mock.patch.dict(os.environ, {"CDC_FAILPOINT": name}):
        yield


def run_step(
    wh: Warehouse,
    database: str,
    entity: Entity,
    ts: datetime,
    rows: list[dict[str, Any]],
    crash: bool = False,
    force_deletes: bool = False,
    bucket_rows: int = BUCKET_ROWS,
    hashed: bool = True,
) -> None:
    """Load one extract into raw and snapshot it, like the Load and Snapshot tasks do."""
    batch = batch_id(ts)
    load_raw(wh, database, entity, batch, rows, hashed)
    ensure_current_hashes(wh, database, entity, batch, bucket_rows)
    if crash:
        with failpoint("snapshot-after-open"):
            try:
                done = apply_batch(
                    wh, database, entity, batch, force_deletes, bucket_rows=bucket_rows
                )
            except FailpointError:
                pass
            else:  # a batch that changes nothing writes nothing: there is no step to crash in
                assert done.versions_opened == done.versions_closed == 0
    result = apply_batch(wh, database, entity, batch, force_deletes, bucket_rows=bucket_rows)
    mark_done(wh, database, entity.name, "snapshot", batch, result)


def view_rows(wh: Warehouse, database: str, entity: Entity) -> list[dict[str, Any]]:
    """The snapshot as a dbt user reads it, in (unique_key, dbt_valid_from) order."""
    names = Names.of(database, entity)
    if not wh.table_exists(database, names.view):
        return []
    order = ", ".join([*map(quote_ident, entity.unique_key), "dbt_valid_from"])
    return wh.query_arrow(f"SELECT * FROM {names.q_view} ORDER BY {order}").to_pylist()


# --- the properties --------------------------------------------------------------------------


@pytest.mark.parametrize("hard_deletes", HARD_DELETES)
@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    composite=st.booleans(),
    # incremental extracts: missing keys are not deletes (the extract is a superset of one)
    incremental=st.sampled_from([False, False, False, True]),
    steps=STEPS,
    bucket_rows=BUCKET_SIZES,
    hashed=st.booleans(),
)
def test_history_matches_oracle(
    wh: Warehouse,
    config: str,
    hard_deletes: str,
    composite: bool,
    incremental: bool,
    steps: list[Step],
    bucket_rows: int,
    hashed: bool,
) -> None:
    """Every version (key, values, dbt_* columns) equals the oracle's, crashes included.

    Small buckets split each merge into several (the path of tables beyond `merge_bucket_rows`);
    batches without load-time hashes take the rehash path.
    """
    entity = make_entity(config, hard_deletes, composite, incremental=incremental)
    oracle = oracle_for(entity)
    with scratch_database(wh) as database:
        for ts, rows, crash in source_states(entity, steps, time_unit(wh)):
            run_step(wh, database, entity, ts, rows, crash, bucket_rows=bucket_rows, hashed=hashed)
            oracle.apply(rows, ts, full_scan=not incremental)
        for what in oracle.events:
            event(what)
        snapshot = view_rows(wh, database, entity)
    assert_history(as_versions(snapshot, entity), oracle.history(), entity)
    assert len({r["dbt_scd_id"] for r in snapshot}) == len(snapshot)


@settings(max_examples=max(EXAMPLES // 2, 5), deadline=None)
@given(
    config=st.sampled_from(list(CONFIGS)),
    hard_deletes=st.sampled_from(HARD_DELETES),
    composite=st.booleans(),
    steps=STEPS,
    bucket_rows=BUCKET_SIZES,
)
def test_crash_after_open_then_rerun_equals_crash_free_run(
    wh: Warehouse,
    config: str,
    hard_deletes: str,
    composite: bool,
    steps: list[Step],
    bucket_rows: int,
) -> None:
    """Every column of the history (dbt_scd_id too) equals that of a run without crashes.

    The crashed run may also merge in small buckets, and rehashes every batch: neither may
    change any version.
    """
    entity = make_entity(config, hard_deletes, composite)
    states = list(source_states(entity, steps, time_unit(wh)))
    with scratch_database(wh) as clean, scratch_database(wh) as crashed:
        for ts, rows, _ in states:
            run_step(wh, database=clean, entity=entity, ts=ts, rows=rows)
            run_step(
                wh, crashed, entity, ts, rows, crash=True, bucket_rows=bucket_rows, hashed=False
            )
        assert check_invariants(wh, Names.of(crashed, entity), entity) == []
        assert view_rows(wh, crashed, entity) == view_rows(wh, clean, entity)


def test_composite_keys_do_not_collide(wh: Warehouse) -> None:
    """('ab','c') and ('a','bc') are two keys with their own histories."""
    entity = make_entity("check-cols", "invalidate", composite=True)
    t1, t2 = BASE + timedelta(seconds=1), BASE + timedelta(seconds=2)
    first = [
        {"k1": "ab", "k2": "c", "name": "x", "score": 1, "note": None, "updated_at": None},
        {"k1": "a", "k2": "bc", "name": "x", "score": 1, "note": None, "updated_at": None},
    ]
    second = [{**first[0], "name": "y"}]  # one changes, the other disappears
    oracle = oracle_for(entity)
    with scratch_database(wh) as database:
        for ts, rows in ((t1, first), (t2, second)):
            run_step(wh, database, entity, ts, rows)
            oracle.apply(rows, ts)
        got = as_versions(view_rows(wh, database, entity), entity)
    assert {v.key for v in got} == {("ab", "c"), ("a", "bc")}
    assert len(got) == 3
    assert_history(got, oracle.history(), entity)


@pytest.mark.parametrize("hard_deletes", ["invalidate", "new_record"])
def test_delete_guard_refuses_then_force_passes(wh: Warehouse, hard_deletes: str) -> None:
    entity = make_entity("check-cols", hard_deletes, composite=False, guard=0.2)
    rows = [
        {"id": i, "name": "n", "score": i, "note": None, "updated_at": None} for i in range(1, 6)
    ]
    t1, t2, t3 = (BASE + timedelta(seconds=s) for s in (1, 2, 3))
    oracle = oracle_for(entity)
    with scratch_database(wh) as database:
        run_step(wh, database, entity, t1, rows)
        oracle.apply(rows, t1)
        run_step(wh, database, entity, t2, rows[1:])  # 1 of 5 = 20%: allowed
        oracle.apply(rows[1:], t2)
        before = view_rows(wh, database, entity)
        load_raw(wh, database, entity, batch_id(t3), rows[3:])  # 2 of 4 = 50%: refused
        ensure_current_hashes(wh, database, entity, batch_id(t3), BUCKET_ROWS)
        with pytest.raises(DeleteGuardError, match=r"retire 2 of 4 live keys"):
            apply_batch(wh, database, entity, batch_id(t3))
        assert view_rows(wh, database, entity) == before
        apply_batch(wh, database, entity, batch_id(t3), force_deletes=True)
        oracle.apply(rows[3:], t3)
        got = as_versions(view_rows(wh, database, entity), entity)
    assert_history(got, oracle.history(), entity)


# --- minimal reproductions of bugs the properties found --------------------------------------


@pytest.mark.parametrize(
    "revived_at", [1, 2, 3], ids=["same-updated_at", "inside-closed-window", "at-deletion"]
)
def test_timestamp_invalidate_revival_keeps_the_deletion(wh: Warehouse, revived_at: int) -> None:
    """A key seen at t1, gone at t3, back at t4 with an updated_at not after t3: the closed
    version [t1, t3) must stay, and the revival must start after it (at t4). Before the fix the
    revival took its updated_at as dbt_valid_from: at t1 it replaced the closed version in the
    ReplacingMergeTree (the deletion vanished), at t2 the windows overlapped (InvariantError)."""
    entity = make_entity("timestamp", "invalidate", composite=False)
    t1, t3, t4 = (BASE + timedelta(seconds=s) for s in (1, 3, 4))
    row = {"id": 1, "name": "a", "score": 1, "note": None, "updated_at": t1}
    revived = {**row, "updated_at": BASE + timedelta(seconds=revived_at)}
    oracle = oracle_for(entity)
    with scratch_database(wh) as database:
        for ts, rows in ((t1, [row]), (t3, []), (t4, [revived])):
            run_step(wh, database, entity, ts, rows)
            oracle.apply(rows, ts)
        got = as_versions(view_rows(wh, database, entity), entity)
    assert_history(got, oracle.history(), entity)
