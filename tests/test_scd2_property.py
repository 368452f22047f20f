"""The SCD2 engine against an independent oracle (tests/scd2_oracle.py) on the real warehouses.

Hypothesis drives random sequences of source states (inserts, updates to checked and unchecked
columns, NULLs, deletes, revivals, optional crashes between opening and closing versions)
through raw tables and `apply_batch` on chDB and on the ClickHouse server, for every strategy
and every hard_deletes mode, and compares the snapshot view with the oracle's history.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
from tests.scd2_oracle import Oracle, Version, invariant_problems

# examples per strategy x hard_deletes x warehouse: the default keeps the file under ~2 min on
# 2 cores (every batch costs ~25 warehouse queries); SCD2_EXAMPLES=100 for a deep run
EXAMPLES = int(os.environ.get("SCD2_EXAMPLES", "12"))
# one bucket per merge, or one bucket per key
BUCKET_SIZES = st.sampled_from([BUCKET_ROWS, BUCKET_ROWS, 1])
BASE = datetime(2024, 1, 1, tzinfo=UTC)
SECOND, MICROSECOND = timedelta(seconds=1), timedelta(microseconds=1)
ENTITY = "item"
CHECKED = ("name", "score")
# single keys, and composite keys whose plain concatenations collide
SINGLE_KEYS: tuple[tuple[Any, ...], ...] = ((1,), (2,), (3,), (4,))
PAIR_KEYS: tuple[tuple[Any, ...], ...] = (("ab", "c"), ("a", "bc"), ("abc", ""), ("", "abc"))
CONFIGS = {
    "check-cols": dict(strategy="check", check_cols=CHECKED),
    "check-all": dict(strategy="check", check_cols=None),
    "timestamp": dict(strategy="timestamp", updated_at="updated_at"),
}
HARD_DELETES = ("ignore", "invalidate", "new_record")
DELETE = "DELETE"


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


# --- scenarios -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    gap: int  # ticks (time_unit) since the previous batch
    ops: dict[int, Any]  # key index -> DELETE or a patch {column: value, "age": ticks}
    crash: bool  # hit the failpoint once, then rerun the batch


NOTES = st.sampled_from([None, "x", "y"])
AGES = st.integers(0, 4)  # updated_at = batch time - age ticks
# an op on one key: a patch of any columns, a patch of unchecked columns only, or a delete;
# a patch on an absent key inserts it (a deleted key comes back with its last values)
OP = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from([None, "", "null", "a", "b"]),
            "score": st.one_of(st.none(), st.integers(-1, 2)),
            "note": NOTES,
            "age": AGES,
        },
    ),
    st.fixed_dictionaries({"note": NOTES}, optional={"age": AGES}),
    st.just(DELETE),
)
STEPS = st.lists(
    st.builds(
        Step,
        gap=st.integers(1, 3),
        ops=st.dictionaries(st.integers(0, 3), OP, min_size=1, max_size=4),
        crash=st.sampled_from([False, False, False, False, True]),
    ),
    min_size=2,
    max_size=6,
)


def make_entity(
    config: str,
    hard_deletes: str,
    composite: bool,
    guard: float = 1.0,
    incremental: bool = False,
) -> Entity:
    return Entity(
        name=ENTITY,
        source="postgres" if incremental else "mongo",
        object_name=ENTITY,
        unique_key=("k1", "k2") if composite else ("id",),
        hard_deletes=hard_deletes,
        mode="incremental" if incremental else "full",
        delete_guard=guard,
        **CONFIGS[config],
    )


def schema_for(entity: Entity) -> pa.Schema:
    if entity.unique_key == ("id",):
        keys = [pa.field("id", pa.int64())]
    else:
        keys = [pa.field(k, pa.string()) for k in entity.unique_key]
    return pa.schema(
        [
            *keys,
            pa.field("name", pa.string()),
            pa.field("score", pa.int64()),
            pa.field("note", pa.string()),
            pa.field("updated_at", pa.timestamp("us", "UTC")),
        ]
    )


def source_states(
    entity: Entity, steps: list[Step], tick: timedelta = SECOND
) -> Iterator[tuple[datetime, list[dict[str, Any]], bool]]:
    """(batch time, full extract, crash) per step: the source evolves by the steps' ops.

    Times move in ticks: whole seconds, or microseconds where the warehouse keeps them."""
    keys = SINGLE_KEYS if entity.unique_key == ("id",) else PAIR_KEYS
    source: dict[int, dict[str, Any]] = {}
    known: dict[int, dict[str, Any]] = {}  # last values of deleted keys: revivals reuse them
    ts = BASE
    for step in steps:
        ts += step.gap * tick
        for i, op in sorted(step.ops.items()):
            if op == DELETE:
                if i in source:
                    known[i] = source.pop(i)
                continue
            row = dict(source.get(i) or known.get(i) or _blank(entity, keys[i]))
            row.update({c: v for c, v in op.items() if c != "age"})
            if "age" in op:
                row["updated_at"] = ts - op["age"] * tick
            elif row["updated_at"] is None and entity.strategy == "timestamp":
                row["updated_at"] = ts
            source[i] = row
        yield ts, [dict(source[i]) for i in sorted(source)], step.crash


def _blank(entity: Entity, key: tuple[Any, ...]) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(entity.unique_key, key, strict=True))
    return row | {"name": None, "score": None, "note": None, "updated_at": None}


# --- driving the engine ----------------------------------------------------------------------


def time_unit(wh: Warehouse) -> timedelta:
    """chDB keeps microseconds (DateTime64): use them; ClickHouse 18.16 keeps whole seconds."""
    return MICROSECOND if wh.features.datetime64 else SECOND


def batch_id(ts: datetime) -> str:
    return ts.strftime("%Y%m%dT%H%M%S%fZ")


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


def as_versions(rows: list[dict[str, Any]], entity: Entity) -> list[Version]:
    source = schema_for(entity).names
    return [
        Version(
            key=tuple(r[k] for k in entity.unique_key),
            values=tuple(sorted((c, _utc(r[c])) for c in source)),
            updated_at=_utc(r["dbt_updated_at"]),
            valid_from=_utc(r["dbt_valid_from"]),
            valid_to=_utc(r["dbt_valid_to"]),
            is_deleted=r.get("dbt_is_deleted"),
        )
        for r in rows
    ]


def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def oracle_for(entity: Entity) -> Oracle:
    return Oracle(
        unique_key=entity.unique_key,
        strategy=entity.strategy,
        check_cols=entity.check_cols,
        updated_at=entity.updated_at,
        hard_deletes=entity.hard_deletes,
    )


def describe(versions: list[Version]) -> str:
    def fmt(t: datetime | None) -> str:
        return "-" if t is None else f"+{(t - BASE).total_seconds():g}s"

    lines = []
    for v in sorted(versions, key=lambda v: (repr(v.key), v.valid_from)):
        values = {c: fmt(x) if c == "updated_at" and x else x for c, x in v.values}
        values = {c: x for c, x in values.items() if c not in ("id", "k1", "k2")}
        flag = f" deleted={v.is_deleted}" if v.is_deleted is not None else ""
        lines.append(
            f"  {v.key!r} [{fmt(v.valid_from)}, {fmt(v.valid_to)}) upd={fmt(v.updated_at)}"
            f"{flag} {values}"
        )
    return "\n".join(lines)


def assert_history(got: list[Version], expected: list[Version], entity: Entity) -> None:
    gaps = entity.hard_deletes == "invalidate"
    assert invariant_problems(got, gaps) == [], describe(got)
    # Version holds unorderable values (None next to str): compare sorted text forms
    if sorted(map(repr, got)) != sorted(map(repr, expected)):
        pytest.fail(f"history differs\nengine:\n{describe(got)}\noracle:\n{describe(expected)}")


# --- the oracle itself, by hand -------------------------------------------------------------


def _at(seconds: int) -> datetime:
    return BASE + timedelta(seconds=seconds)


def _v(
    key: int,
    row: dict[str, Any],
    start: int,
    end: int | None,
    updated: int,
    deleted: str | None = None,
) -> Version:
    values = tuple(sorted({"id": key, **row}.items()))
    stop = None if end is None else _at(end)
    return Version((key,), values, _at(updated), _at(start), stop, deleted)


def test_oracle_check_new_record_by_hand() -> None:
    """Unchecked change: no version; NULL vs '': a version; delete: tombstone; revival."""
    oracle = oracle_for(make_entity("check-cols", "new_record", composite=False))
    a = {"name": "", "score": 1, "note": "x", "updated_at": None}
    b = {**a, "note": "y"}  # unchecked column only
    c = {**b, "name": None}  # '' -> NULL
    for t, rows in ((1, [a]), (2, [b]), (3, [c]), (4, []), (5, []), (6, [c])):
        oracle.apply([{"id": 1, **r} for r in rows], _at(t))
    assert oracle.history() == [
        _v(1, a, 1, 3, 1, "False"),
        _v(1, c, 3, 4, 3, "False"),
        _v(1, c, 4, 6, 4, "True"),
        _v(1, c, 6, None, 6, "False"),
    ]


def test_oracle_timestamp_invalidate_by_hand() -> None:
    """Not newer: ignored; newer: valid from updated_at; deleted, then back with an old
    updated_at: valid from the batch time (after the closed window)."""
    oracle = oracle_for(make_entity("timestamp", "invalidate", composite=False))
    a = {"name": "a", "score": None, "note": None, "updated_at": _at(1)}
    b = {**a, "name": "b"}  # same updated_at: ignored
    c = {**a, "name": "c", "updated_at": _at(3)}
    for t, rows in ((2, [a]), (3, [b]), (4, [c]), (6, []), (8, [a])):
        oracle.apply([{"id": 1, **r} for r in rows], _at(t))
    assert oracle.history() == [_v(1, a, 1, 3, 1), _v(1, c, 3, 6, 3), _v(1, a, 8, None, 1)]


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
