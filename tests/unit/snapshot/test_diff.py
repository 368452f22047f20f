"""The pure SCD2 diff (`pipeline.snapshot.diff.diff`) against the independent oracle, on Arrow.

Hypothesis draws source histories (tests/support/scd2_scenarios.py). Each batch is diffed
against the current versions of an in-memory history, and the diff's output is applied to that
history the way the merge writes it (opens, then tombstones, then closes), keyed like the
storage's ReplacingMergeTree by (unique key, dbt_valid_from) so that an open that would replace
a stored version is caught. At the end the history must equal the oracle's, for every strategy,
every hard_deletes mode, full scans, incremental windows and reconciled windows, with the
batch as whole rows or as (key, hash) pairs, and with or without the warehouse's pre-filter
(unchanged pairs dropped on both sides, as `pipeline.snapshot.plan` does) in front of it.
The same oracle runs through the real warehouses in tests/integration/snapshot/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.config import Entity
from pipeline.core.errors import DeleteGuardError, SnapshotError
from pipeline.core.hashing import row_hash
from pipeline.snapshot.diff import Diff, Spec, diff, hash_columns, spec_for
from pipeline.snapshot.invariants import invariant_violations
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
    make_entity,
    oracle_for,
    schema_for,
    source_states,
)

EXAMPLES = int(os.environ.get("SCD2_UNIT_EXAMPLES", "60"))
TS = pa.timestamp("us", "UTC")
Key = tuple[Any, ...]


@dataclass
class History:
    """A snapshot's storage in memory: one dict per version, keyed by (key, dbt_valid_from)."""

    entity: Entity
    versions: dict[tuple[Key, datetime], dict[str, Any]] = field(default_factory=dict)

    def key(self, row: dict[str, Any]) -> Key:
        return tuple(row[k] for k in self.entity.unique_key)

    @property
    def new_record(self) -> bool:
        return self.entity.hard_deletes == "new_record"

    def current(self) -> list[dict[str, Any]]:
        return [v for v in self.versions.values() if v["dbt_valid_to"] is None]

    def live(self, version: dict[str, Any]) -> bool:
        return version.get("dbt_is_deleted") != "True"

    def table(self, versions: list[dict[str, Any]]) -> pa.Table:
        """Current versions as the diff reads them (`Plan.current_columns`)."""
        keys = schema_for(self.entity)
        fields = [keys.field(k) for k in self.entity.unique_key]
        fields += [pa.field("dbt_scd_id", pa.string()), pa.field("_hash", pa.uint64())]
        if self.entity.strategy == "timestamp":
            fields += [pa.field("dbt_updated_at", TS), pa.field("dbt_valid_from", TS)]
        if self.new_record:
            fields.append(pa.field("dbt_is_deleted", pa.string()))
        schema = pa.schema(fields)
        return pa.Table.from_pylist([{f: v[f] for f in schema.names} for v in versions], schema)

    def ended(self) -> pa.Table:
        """Last dbt_valid_to of every key with closed versions (`Plan.ended_sql`)."""
        last: dict[Key, datetime] = {}
        for v in self.versions.values():
            if v["dbt_valid_to"] is not None:
                key = self.key(v)
                last[key] = max(last.get(key, v["dbt_valid_to"]), v["dbt_valid_to"])
        keys = schema_for(self.entity)
        schema = pa.schema(
            [*(keys.field(k) for k in self.entity.unique_key), ("last_valid_to", TS)]
        )
        rows = [
            {**dict(zip(self.entity.unique_key, k, strict=True)), "last_valid_to": t}
            for k, t in last.items()
        ]
        return pa.Table.from_pylist(rows, schema)

    def _store(self, version: dict[str, Any]) -> None:
        slot = (self.key(version), version["dbt_valid_from"])
        assert slot not in self.versions, (
            f"an open at {slot} would replace a stored version in the ReplacingMergeTree"
        )
        self.versions[slot] = version

    def apply(self, d: Diff, source: dict[Key, dict[str, Any]]) -> None:
        """Write a diff as `merge.Pending.write` does: opens, tombstones, then closes."""
        by_id = {v["dbt_scd_id"]: v for v in self.versions.values()}
        for row in d.opened.to_pylist():
            key = self.key(row)
            version = {
                **source[key],  # the merge copies the opened rows from the raw batch
                "dbt_scd_id": f"{key!r}|{row['dbt_valid_from'].isoformat()}",
                "dbt_updated_at": row["dbt_updated_at"],
                "dbt_valid_from": row["dbt_valid_from"],
                "dbt_valid_to": None,
                "_hash": row["_hash"],
            }
            if self.new_record:
                version["dbt_is_deleted"] = "False"
            self._store(version)
        closes = d.closed.to_pylist()
        for row in closes:
            if row["_tombstone"]:
                old = by_id[row["dbt_scd_id"]]
                at = row["_new_valid_to"]
                self._store(
                    {
                        **old,
                        "dbt_scd_id": f"{self.key(old)!r}|{at.isoformat()}",
                        "dbt_updated_at": at,
                        "dbt_valid_from": at,
                        "dbt_valid_to": None,
                        "dbt_is_deleted": "True",
                    }
                )
        for row in closes:
            old = by_id[row["dbt_scd_id"]]
            assert old["dbt_valid_to"] is None, f"closing a closed version: {old}"
            assert self.key(old) == self.key(row)
            old["dbt_valid_to"] = row["_new_valid_to"]

    def versions_table(self) -> pa.Table:
        keys = schema_for(self.entity)
        schema = pa.schema(
            [
                *(keys.field(k) for k in self.entity.unique_key),
                ("dbt_valid_from", TS),
                ("dbt_valid_to", TS),
            ]
        )
        rows = [{f: v[f] for f in schema.names} for v in self.versions.values()]
        return pa.Table.from_pylist(rows, schema)


def hashes(entity: Entity, rows: list[dict[str, Any]], spec: Spec) -> list[int]:
    """The change hash of each row, as the load stores it (`_check_hash`)."""
    table = pa.Table.from_pylist(rows, schema_for(entity))
    return row_hash(table, hash_columns(spec, table.column_names)).to_pylist()


def batch_table(entity: Entity, rows: list[dict[str, Any]], spec: Spec, as_pairs: bool) -> pa.Table:
    """The batch as whole rows (the diff hashes them) or as the merge reads it from raw:
    key columns, `_hash` and, for the timestamp strategy, `updated_at`."""
    table = pa.Table.from_pylist(rows, schema_for(entity))
    if not as_pairs:
        return table
    columns = list(entity.unique_key)
    if entity.strategy == "timestamp":
        columns.append("updated_at")
    return table.select(columns).append_column(
        "_hash", pa.array(hashes(entity, rows, spec), pa.uint64())
    )


def prefiltered(
    history: History,
    rows: list[dict[str, Any]],
    spec: Spec,
    reconciled: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What reaches the diff after the warehouse's anti-joins (`Plan.changed_sql`,
    `Plan.current_sql`): batch rows that are not a live current (key, hash), and current
    versions that are not in the batch with the same hash."""
    key = history.key
    pairs = {(key(r), h) for r, h in zip(rows, hashes(history.entity, rows, spec), strict=True)}
    in_batch = {key(r) for r in rows}
    current = history.current()
    live_pairs = {(key(v), v["_hash"]) for v in current if history.live(v)}
    incoming = [
        r
        for r, h in zip(rows, hashes(history.entity, rows, spec), strict=True)
        if (key(r), h) not in live_pairs
    ]
    retires = spec.hard_deletes != "ignore" and (spec.full_scan or reconciled)
    kept = []
    for v in current:
        differs = (key(v), v["_hash"]) not in pairs
        wanted = differs and key(v) in in_batch if not retires else differs
        if history.new_record and not history.live(v) and key(v) in in_batch:
            wanted = True
        if wanted:
            kept.append(v)
    return incoming, kept


@pytest.mark.parametrize("hard_deletes", HARD_DELETES)
@pytest.mark.parametrize("config", list(CONFIGS))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    composite=st.booleans(),
    scan=st.sampled_from(["full", "full", "incremental", "reconciled"]),
    as_pairs=st.booleans(),
    prefilter=st.booleans(),
    tick=st.sampled_from([SECOND, MICROSECOND]),
    steps=STEPS,
    data=st.data(),
)
def test_diff_applied_to_a_history_matches_the_oracle(
    config: str,
    hard_deletes: str,
    composite: bool,
    scan: str,
    as_pairs: bool,
    prefilter: bool,
    tick: timedelta,
    steps: list[Step],
    data: st.DataObject,
) -> None:
    entity = make_entity(config, hard_deletes, composite, incremental=scan != "full")
    spec = spec_for(entity)
    history = History(entity)
    oracle = oracle_for(entity)
    previous: dict[Key, dict[str, Any]] = {}
    for ts, rows, _ in source_states(entity, steps, tick):
        source = {history.key(r): r for r in rows}
        batch = rows
        if scan != "full":  # a window: the changed rows and some of the others (lookback)
            again = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
            batch = [
                r
                for r, a in zip(rows, again, strict=True)
                if a or previous.get(history.key(r)) != r
            ]
        reconciled = scan == "reconciled"
        incoming, current = history.current(), history.current()
        incoming = batch
        if prefilter:
            incoming, current = prefiltered(history, batch, spec, reconciled)
        present = None
        if reconciled:
            # the merge lists the source's keys as a `_present` flag on the current versions
            listed = [v for v in current if history.key(v) in source] if prefilter else rows
            keys = [{k: v[k] for k in entity.unique_key} for v in listed]
            present = pa.Table.from_pylist(
                keys, pa.schema([schema_for(entity).field(k) for k in entity.unique_key])
            )
            if hard_deletes == "ignore":
                present = None  # `reconcile` with `ignore` is refused by the config
        ended = history.ended() if config == "timestamp" and hard_deletes == "invalidate" else None
        d = diff(
            spec,
            history.table(current),
            batch_table(entity, incoming, spec, as_pairs),
            ts,
            present,
            ended,
        )
        opened_keys = {history.key(r) for r in d.opened.to_pylist()}
        closed = d.closed.to_pylist()
        assert d.live_before == sum(history.live(v) for v in current)
        assert d.retired == sum(history.key(c) not in opened_keys for c in closed)
        assert d.tombstones == (d.retired if hard_deletes == "new_record" else 0)
        assert d.empty == (not opened_keys and not closed)
        history.apply(d, source)
        assert invariant_violations(spec, history.versions_table()) == []
        oracle.apply(batch if scan == "incremental" else rows, ts, full_scan=scan != "incremental")
        previous = source
    for what in oracle.events:
        event(what)
    versions = sorted(
        history.versions.values(), key=lambda v: (repr(history.key(v)), v["dbt_valid_from"])
    )
    assert_history(as_versions(versions, entity), oracle.history(), entity)
    assert len({v["dbt_scd_id"] for v in versions}) == len(versions)


# --- by hand ----------------------------------------------------------------------------------


def _spec(**overrides: Any) -> Spec:
    return replace(spec_for(make_entity("check-cols", "invalidate", composite=False)), **overrides)


def _rows(*rows: dict[str, Any]) -> pa.Table:
    entity = make_entity("check-cols", "invalidate", composite=False)
    full = [{"name": None, "score": None, "note": None, "updated_at": None, **r} for r in rows]
    return pa.Table.from_pylist(full, schema_for(entity))


def _current(*ids: int, spec: Spec) -> pa.Table:
    entity = make_entity("check-cols", "invalidate", composite=False)
    history = History(entity)
    table = _rows(*({"id": i, "name": "n"} for i in ids))
    d = diff(spec, history.table([]), table, BASE)
    history.apply(d, {(r["id"],): r for r in table.to_pylist()})
    return history.table(history.current())


def test_a_first_batch_opens_every_row_at_the_batch_time() -> None:
    spec = _spec()
    d = diff(spec, _current(spec=spec), _rows({"id": 1}, {"id": 2, "name": "x"}), BASE)
    assert d.opened.column("id").to_pylist() == [1, 2]
    assert d.opened.column("dbt_valid_from").to_pylist() == [BASE, BASE]
    assert d.opened.column("dbt_updated_at").to_pylist() == [BASE, BASE]
    assert d.closed.num_rows == 0 and (d.live_before, d.retired) == (0, 0)


def test_an_unchecked_change_opens_nothing_and_a_checked_one_closes_the_old_version() -> None:
    spec = _spec()
    current = _current(1, 2, spec=spec)
    later = BASE + timedelta(seconds=1)
    d = diff(
        spec, current, _rows({"id": 1, "name": "n", "note": "new"}, {"id": 2, "name": "m"}), later
    )
    assert d.opened.column("id").to_pylist() == [2]
    assert d.closed.select(["id", "_new_valid_to", "_tombstone"]).to_pylist() == [
        {"id": 2, "_new_valid_to": later, "_tombstone": False}
    ]
    assert d.closed.column("dbt_scd_id").to_pylist() == [
        current.filter(pa.compute.equal(current.column("id"), 2)).column("dbt_scd_id")[0].as_py()
    ]


def test_the_delete_guard_weighs_retirements_against_live_keys() -> None:
    spec = _spec(delete_guard=0.2)
    current = _current(1, 2, 3, 4, 5, spec=spec)
    later = datetime(2024, 1, 2, tzinfo=UTC)
    kept = _rows(*({"id": i, "name": "n"} for i in (2, 3, 4, 5)))
    assert diff(spec, current, kept, later).retired == 1  # 1 of 5 = 20%: allowed
    with pytest.raises(DeleteGuardError) as err:
        diff(spec, current, kept.slice(0, 2), later)
    message = str(err.value)
    assert (
        "item: this full extract would retire 3 of 5 live keys (60% > delete_guard 20%)" in message
    )
    assert "--force-deletes" in message and err.value.entity == "item"
    assert diff(replace(spec, force_deletes=True), current, kept.slice(0, 2), later).retired == 3


def test_incremental_batches_retire_nothing_without_a_key_list() -> None:
    spec = _spec(full_scan=False)
    current = _current(1, 2, spec=spec)
    later = BASE + timedelta(seconds=1)
    assert diff(spec, current, _rows(), later).empty
    present = pa.table({"id": pa.array([2], pa.int64())})
    d = diff(spec, current, _rows(), later, present=present)
    assert d.retired == 1 and d.closed.column("id").to_pylist() == [1]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": None, "name": "x"}], "item: 1 row(s) have NULL unique_key column 'id'"),
        (
            [{"id": 1}, {"id": 1}, {"id": 2}, {"id": 2}, {"id": 3}],
            "item: 2 unique_key value(s) appear more than once in the batch, e.g. ['1', '2']",
        ),
    ],
)
def test_bad_batch_keys_are_refused(rows: list[dict[str, Any]], message: str) -> None:
    spec = _spec()
    with pytest.raises(SnapshotError) as err:
        diff(spec, _current(spec=spec), _rows(*rows), BASE)
    assert str(err.value) == message


def test_a_batch_without_the_key_column_is_refused() -> None:
    spec = _spec(unique_key=("missing",))
    with pytest.raises(
        SnapshotError, match="item: unique_key column 'missing' is not in the batch"
    ):
        diff(spec, pa.table({"missing": pa.array([], pa.int64())}), _rows({"id": 1}), BASE)
