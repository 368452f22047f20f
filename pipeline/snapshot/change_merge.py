"""The merge of a change batch: every change of a key, in commit order, becomes history.

    order      batches apply in batch order (as in `merge`)
    prepare    storage, view and settings ready (as in `merge`)
    diff       bucket by bucket: the batch's changes and each touched key's live version reach
               `changes.diff_changes`, which parks the versions to open and close
    write      opens copied from their change rows, deletion versions, then closes
    verify     the invariants of the keys the batch touched

A rerun of a crashed batch is exact for the same reason as in `merge`: the history before the
batch is read by batch ids, and writing the same versions again is absorbed by the key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core.batch import batch_time
from pipeline.core.errors import InvariantError, SnapshotError
from pipeline.core.hashing import check_signature
from pipeline.core.names import OP, SCAN_OP
from pipeline.snapshot.change_plan import ChangePlan
from pipeline.snapshot.changes import ChangeDiff, diff_changes
from pipeline.snapshot.diff import spec_for
from pipeline.snapshot.invariants import BUCKET_ROWS, FULL_CHECK_SHARE, check_invariants
from pipeline.snapshot.merge import Batch, check_order, park, prepare
from pipeline.snapshot.plan import groups
from pipeline.snapshot.storage import Names, effective_time
from pipeline.state import StageResult, failpoint
from pipeline.warehouse import Warehouse, qualified
from pipeline.warehouse.buckets import Buckets
from pipeline.warehouse.sql import render

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class BatchRows:
    """A change entity's raw rows of a batch: all, a whole re-read's (a first load or a
    resync, which the full-scan merge applies instead), and those hashed for other
    `check_cols` (none once the load side has rehashed the batch)."""

    rows: int = 0
    scanned: int = 0
    stale: int = 0


def batch_rows(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> BatchRows:
    """One count of the batch's rows answers what `apply` and the merge would ask apart."""
    if not wh.table_exists(database, entity.raw_table):
        return BatchRows()
    rows = wh.query_rows(
        f"SELECT count(), countIf({OP} = %(op)s), countIf(_check_cols != %(s)s)"
        f" FROM {qualified(database, entity.raw_table)} WHERE _batch_id = %(b)s",
        {"b": batch_id, "op": SCAN_OP, "s": check_signature(entity.check_cols)},
    )
    return BatchRows(*(int(n or 0) for n in rows[0]))


class Parked:
    """A change batch's versions parked per bucket until every bucket is diffed."""

    def __init__(self, wh: Warehouse, sql: ChangePlan) -> None:
        self.wh, self.sql = wh, sql
        self.opened: dict[int, int] = {}
        self.closed: dict[int, int] = {}
        self.ended_in_batch = 0
        self.created = False

    def add(self, bucket: int, d: ChangeDiff, current: pa.Table) -> None:
        import pyarrow as pa

        if d.empty:
            return
        names = self.sql.plan.names
        if not self.created:
            stored = self.wh.columns(names.database, names.storage)
            for statement in self.sql.create_sqls(stored):
                self.wh.execute(statement)
            self.created = True
        flags = {"_tombstone", "_replaces"}
        opened = d.opened.drop_columns(["_hash"])  # the hash is copied from the change row
        for name in flags:
            index = opened.column_names.index(name)
            opened = opened.set_column(index, name, opened.column(name).cast(pa.uint8()))
        closed = _whole(current, d.closed).append_column(
            "_tombstone", pa.repeat(pa.scalar(0, pa.uint8()), d.closed.num_rows)
        )
        database = names.database
        park(self.wh, database, self.sql.open_table, opened, bucket, self.opened)
        park(self.wh, database, self.sql.close_table, closed, bucket, self.closed)
        self.ended_in_batch += d.opened.num_rows - d.opened.column("dbt_valid_to").null_count

    def drop(self) -> None:
        if self.created:
            for statement in self.sql.drop_sqls():
                self.wh.execute(statement)


def _whole(current: pa.Table, closed: pa.Table) -> pa.Table:
    """The stored rows the batch closes (`current` holds one row per key, so one per
    dbt_scd_id), with where each now ends."""
    import pyarrow as pa

    row_of = {scd_id: row for row, scd_id in enumerate(current.column("dbt_scd_id").to_pylist())}
    rows = pa.array([row_of[s] for s in closed.column("dbt_scd_id").to_pylist()], pa.int64())
    return current.take(rows).append_column("_new_valid_to", closed.column("_new_valid_to"))


def _diff(
    wh: Warehouse, batch: Batch, sql: ChangePlan, buckets: Buckets, parked: Parked, step: int
) -> None:
    """Diff each bucket's changes against its keys' live versions and park the result."""
    plan = batch.plan
    spec = spec_for(plan.entity)
    # the batch time places only changes without a time of their own (first-load rows); it
    # reads the whole history's latest version, so a batch of timed changes never asks
    batch_ts: datetime | None = None
    for bucket in range(buckets.count):
        where = buckets.where(bucket)
        changes = wh.query_arrow(sql.changes_sql(where), plan.params)
        if not changes.num_rows:
            continue
        _refuse_null_keys(plan.entity, changes, plan.batch_id)
        if batch_ts is None and changes.column("_time").null_count:
            batch_ts = effective_time(wh, plan.names, plan.batch_id)
        current = wh.query_arrow(sql.current_sql(where), plan.params)
        ended_sql = sql.ended_sql(where)
        ended: pa.Table | None = wh.query_arrow(ended_sql, plan.params) if ended_sql else None
        at = batch_ts or batch_time(plan.batch_id)  # unused when every change has its time
        d = diff_changes(spec, current, changes, at, plan.entity.collapse, ended, step)
        parked.add(bucket, d, current)


def _refuse_null_keys(entity: Entity, changes: pa.Table, batch_id: str) -> None:
    for key in entity.unique_key:
        nulls = changes.column(key).null_count
        if nulls:
            raise SnapshotError(
                f"{entity.name}: {nulls} change(s) of batch {batch_id} have a NULL unique_key"
                f" column {key!r}",
                entity=entity.name,
                batch=batch_id,
            )


def _write(wh: Warehouse, batch: Batch, sql: ChangePlan, parked: Parked, bucket_rows: int) -> None:
    """Opens, deletion versions, then closes; each statement idempotent."""
    plan = batch.plan
    names = plan.names
    version = time.time_ns()
    params: dict[str, object] = {**plan.params, "v": version}
    stored = list(wh.columns(names.database, names.storage))
    columns = [c for c in batch.source if c in stored]
    for group in groups(parked.opened, bucket_rows):
        wh.execute(sql.open_sql(columns, group, tombstone=False), params)
        if plan.entity.hard_deletes == "new_record":
            wh.execute(sql.open_sql(columns, group, tombstone=True), params)
            wh.execute(sql.stored_tombstone_sql(stored, group), params)
    failpoint("snapshot-after-open", f"{names.storage} batch {plan.batch_id}")
    for group in groups(parked.closed, bucket_rows):
        wh.execute(sql.close_sql(stored, group), params)


def _verify(wh: Warehouse, batch: Batch, sql: ChangePlan, touched: int, bucket_rows: int) -> None:
    plan = batch.plan
    # versions not known to be closed, counted before the batch without FINAL: at least the
    # live ones, so a batch that touched few keys is checked on those keys only, at the cost
    # of the changes (a FINAL count would read the whole history every batch)
    few = touched <= FULL_CHECK_SHARE * max(batch.current_rows, 1)
    keys = render(sql.touched_keys_sql(), plan.params) if few else None
    problems = check_invariants(wh, plan.names, plan.entity, keys, bucket_rows)
    if problems:
        raise InvariantError(
            "SCD2 invariants broken:\n" + "\n".join(problems),
            entity=plan.entity.name,
            batch=plan.batch_id,
        )


def apply_change_batch(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch_id: str,
    names: Names | None = None,
    bucket_rows: int = BUCKET_ROWS,
    counts: BatchRows | None = None,
) -> StageResult:
    """Apply one loaded batch of changes to the entity's history, in batch order (`counts`:
    the batch's `batch_rows`, where the caller has them)."""
    if names is None:
        names = Names.of(database, entity)
        if not check_order(wh, database, entity, batch_id):
            return StageResult()
    counted = counts if counts is not None else batch_rows(wh, database, entity, batch_id)
    batch = prepare(wh, database, entity, batch_id, names, stale=counted.stale)
    if batch is None or not batch.plan.has_raw:
        return StageResult()
    plan = batch.plan
    sql = ChangePlan(plan, batch.key_types, wh.features.timestamp_type)
    rows_in = counted.rows  # every row is hashed for the current check_cols (prepare refused)
    if not rows_in:
        return StageResult()
    buckets = Buckets.sized(rows_in, bucket_rows, entity.unique_key)
    step = 1 if wh.features.datetime64 else 1_000_000
    parked = Parked(wh, sql)
    try:
        _diff(wh, batch, sql, buckets, parked, step)
        touched = sum(parked.opened.values()) + sum(parked.closed.values())
        if touched:
            _write(wh, batch, sql, parked, bucket_rows)
            _verify(wh, batch, sql, touched, bucket_rows)
    finally:
        parked.drop()
    opened = sum(parked.opened.values())
    closed = sum(parked.closed.values()) + parked.ended_in_batch
    return StageResult(
        rows_in=rows_in, rows_out=opened, versions_opened=opened, versions_closed=closed
    )
