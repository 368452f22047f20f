"""The merge of a change batch: every change of a key, in commit order, becomes history.

    order      batches apply in batch order (as in `merge`)
    prepare    storage, view and settings ready (as in `merge`)
    diff       bucket by bucket: the batch's changes and each touched key's live version reach
               `changes.diff_changes`, which finds the versions to open and close
    write      on chDB, each bucket's versions straight from Arrow (`Direct`); elsewhere every
               bucket is parked first, then opens copied from their change rows, deletion
               versions, then closes (`Parked`, `_write`)
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
from pipeline.core.names import CHANGE_TIME, OP, SCAN_OP, SEQ
from pipeline.snapshot.change_plan import ChangePlan
from pipeline.snapshot.change_versions import closed_rows, opened_rows, stored_closed
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
    """A change batch's versions parked per bucket until every bucket is diffed, then copied
    into storage by SQL (`_write`): the way of a warehouse that cannot read Arrow in SQL."""

    def __init__(self, wh: Warehouse, batch: Batch, sql: ChangePlan) -> None:
        self.wh, self.batch, self.sql = wh, batch, sql
        self.opened: dict[int, int] = {}
        self.closed: dict[int, int] = {}
        self.ended_in_batch = 0
        self.created = False

    def changes(self, where: str) -> pa.Table:
        return self.wh.query_arrow(self.sql.changes_sql(where), self.sql.plan.params)

    def add(self, bucket: int, d: ChangeDiff, current: pa.Table) -> None:
        import pyarrow as pa

        self.ended_in_batch += d.opened.num_rows - d.opened.column("dbt_valid_to").null_count
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
        closed = stored_closed(current, d.closed).append_column(
            "_tombstone", pa.repeat(pa.scalar(0, pa.uint8()), d.closed.num_rows)
        )
        database = names.database
        park(self.wh, database, self.sql.open_table, opened, bucket, self.opened)
        park(self.wh, database, self.sql.close_table, closed, bucket, self.closed)

    def finish(self, bucket_rows: int) -> str:
        """Write what is parked; the subquery of the keys it touched."""
        _write(self.wh, self.batch, self.sql, self, bucket_rows)
        return self.sql.touched_keys_sql()

    def drop(self) -> None:
        if self.created:
            for statement in self.sql.drop_sqls():
                self.wh.execute(statement)


class Direct:
    """A change batch's versions written bucket by bucket straight from the Arrow rows the
    diff read (`change_versions`), where the warehouse reads Arrow in SQL (chDB): no parking
    tables, no copy from raw. Buckets hold distinct keys and the history before the batch is
    read by batch ids, so writing one bucket changes no other's diff, and a rerun of a crashed
    batch writes the same versions again (absorbed by the key, as in `_write`)."""

    def __init__(self, wh: Warehouse, batch: Batch, sql: ChangePlan) -> None:
        self.wh, self.batch, self.sql = wh, batch, sql
        names = sql.plan.names
        self.stored = list(wh.columns(names.database, names.storage))
        self.source = [c for c in batch.source if c in self.stored]
        self.opened: dict[int, int] = {}
        self.closed: dict[int, int] = {}
        self.ended_in_batch = 0
        self.version = time.time_ns()
        self._rows: pa.Table | None = None

    def changes(self, where: str) -> pa.Table:
        """The bucket's change rows whole (kept for `add`), as `changes_sql` names them."""
        import pyarrow as pa

        entity = self.sql.plan.entity
        rows = self.wh.query_arrow(self.sql.rows_sql(self.source, where), self.sql.plan.params)
        self._rows = rows
        wanted = {k: k for k in entity.unique_key}
        wanted |= {SEQ: SEQ, OP: OP, "_check_hash": "_hash", CHANGE_TIME[entity.mode]: "_time"}
        if entity.strategy == "timestamp":
            assert entity.updated_at is not None
            wanted[entity.updated_at] = entity.updated_at
        return pa.table({new: rows.column(old) for old, new in wanted.items()})

    def add(self, bucket: int, d: ChangeDiff, current: pa.Table) -> None:
        self.ended_in_batch += d.opened.num_rows - d.opened.column("dbt_valid_to").null_count
        if d.empty:
            return
        assert self._rows is not None, "changes() reads the bucket first"
        plan, wh = self.sql.plan, self.wh
        names, entity = plan.names, plan.entity
        opened = opened_rows(
            d.opened,
            self._rows,
            current,
            list(entity.unique_key),
            self.source,
            plan.batch_id,
            self.version,
            entity.hard_deletes == "new_record",
        )
        columns = self.sql.opened_columns(self.source)
        for table in opened:
            wh.insert_select(names.database, names.storage, table, columns)
        self.opened[bucket] = d.opened.num_rows
        failpoint("snapshot-after-open", f"{names.storage} batch {plan.batch_id}")
        closed = closed_rows(d.closed, current, self.stored, plan.batch_id, self.version)
        wh.insert_arrow(names.database, names.storage, closed)
        self.closed[bucket] = closed.num_rows
        self._rows = None

    def finish(self, bucket_rows: int) -> str:
        """Nothing is left to write; the keys touched are among the batch's."""
        return self.sql.batch_keys_sql()

    def drop(self) -> None:
        """Nothing was parked."""


Writer = Parked | Direct


def _diff(
    wh: Warehouse, batch: Batch, sql: ChangePlan, buckets: Buckets, writer: Writer, step: int
) -> None:
    """Diff each bucket's changes against its keys' live versions and hand the result on."""
    plan = batch.plan
    spec = spec_for(plan.entity)
    # the batch time places only changes without a time of their own (first-load rows); it
    # reads the whole history's latest version, so a batch of timed changes never asks
    batch_ts: datetime | None = None
    for bucket in range(buckets.count):
        where = buckets.where(bucket)
        changes = writer.changes(where)
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
        writer.add(bucket, d, current)


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


def _verify(wh: Warehouse, batch: Batch, touched: int, keys_sql: str, bucket_rows: int) -> None:
    plan = batch.plan
    # versions not known to be closed, counted before the batch without FINAL: at least the
    # live ones, so a batch that touched few keys is checked on those keys only, at the cost
    # of the changes (a FINAL count would read the whole history every batch)
    few = touched <= FULL_CHECK_SHARE * max(batch.current_rows, 1)
    keys = render(keys_sql, plan.params) if few else None
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
    writer: Writer = (Direct if wh.reads_arrow_in_sql else Parked)(wh, batch, sql)
    try:
        _diff(wh, batch, sql, buckets, writer, step)
        touched = sum(writer.opened.values()) + sum(writer.closed.values())
        if touched:
            keys_sql = writer.finish(bucket_rows)
            _verify(wh, batch, touched, keys_sql, bucket_rows)
    finally:
        writer.drop()
    opened = sum(writer.opened.values())
    closed = sum(writer.closed.values()) + writer.ended_in_batch
    return StageResult(
        rows_in=rows_in, rows_out=opened, versions_opened=opened, versions_closed=closed
    )
