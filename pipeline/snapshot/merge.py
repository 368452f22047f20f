"""The snapshot merge: apply one raw batch to an entity's SCD2 history, as named phases.

    order      batches apply in batch order; an applied batch is a no-op
    prepare    storage and view exist with the batch's columns; the batch's hashes are current
    validate   no NULL or repeated keys; the batch's (key, hash) digest
    shortcut   a full scan equal to the live versions, or no changed row, ends here
    diff       bucket by bucket, only new, changed and vanished keys reach `diff.diff`
    guard      the delete guard weighs the whole batch's retirements
    write      opens, tombstones, closes (each idempotent)
    verify     the invariants of the keys the batch touched

A rerun of a crashed batch is exact because the "before" state is read by batch ids (see
`plan`), so the crashed attempt's own writes are invisible to the diff, and writing the same
rows again is absorbed by the ReplacingMergeTree's key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from pipeline.checks import check_columns, check_valid_to_current
from pipeline.config import Entity
from pipeline.core.errors import InvariantError, SnapshotError
from pipeline.core.names import RAW_META_COLUMNS
from pipeline.snapshot.diff import Diff, Spec, check_delete_guard, diff, spec_for
from pipeline.snapshot.invariants import (
    BUCKET_ROWS,
    FULL_CHECK_SHARE,
    check_invariants,
    first_load_violations,
)
from pipeline.snapshot.plan import Parking, Plan, groups
from pipeline.snapshot.storage import (
    Names,
    count_versions,
    effective_time,
    ensure_storage,
    ensure_view,
    holds_columns,
    raw_schema,
    reconciled,
)
from pipeline.state import StageResult, failpoint, last_done
from pipeline.warehouse import Warehouse, literal
from pipeline.warehouse.buckets import Buckets
from pipeline.warehouse.cluster import scratch_in
from pipeline.warehouse.sql import render, timestamp_sql

if TYPE_CHECKING:
    import pyarrow as pa

STAGE = "snapshot"
# a bucket's warehouse anti-join covers at most this many times `merge_bucket_rows` keys
SCAN_FACTOR = 10


@dataclass(frozen=True)
class Batch:
    """What `prepare` learnt of the batch and the history it meets."""

    plan: Plan
    source: list[str]  # the raw table's source columns
    key_types: dict[str, str]
    stored_rows: int
    current_rows: int


def check_order(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> bool:
    """Whether the batch still has to be applied; an older batch than the last is refused."""
    last = last_done(wh, database, entity.name, STAGE)
    if last == batch_id:
        return False  # applied already: re-applying changes nothing
    if last is not None and batch_id < last:
        raise SnapshotError(
            f"{entity.name}: batch {batch_id} is older than the last applied batch {last};"
            " batches apply in order",
            entity=entity.name,
            batch=batch_id,
        )
    return True


def prepare(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch_id: str,
    names: Names,
    stale: int | None = None,
) -> Batch | None:
    """Storage, view and settings ready for the batch; None when there is nothing to apply.

    Without a raw table (it was dropped) the batch is an empty extract: everything disappeared.
    `stale`: the batch's rows hashed for other `check_cols`, where the caller has counted them.
    """
    has_raw = wh.table_exists(database, entity.raw_table)
    if not has_raw and not wh.table_exists(database, names.storage):
        return None
    check_valid_to_current(entity, wh)
    types = wh.columns(database, entity.raw_table if has_raw else names.storage)
    source = [c for c in types if c not in RAW_META_COLUMNS] if has_raw else []
    if has_raw:
        check_columns(entity, source, f"raw table {database}.{entity.raw_table}")
        if holds_columns(wh, names, source):
            if names.view is not None:
                ensure_view(wh, names, entity)
        else:
            ensure_storage(wh, names, entity, raw_schema(wh, database, entity, source))
    stored_rows, current_rows = count_versions(wh, names)
    plan = Plan(
        names,
        entity,
        batch_id,
        has_raw,
        reconciled(wh, database, entity, batch_id),
        has_history=current_rows > 0,
        scratch_in=scratch_in(wh),
    )
    if has_raw:
        _refuse_stale(wh, plan, stale)
    key_types = {k: types[k] for k in entity.unique_key}
    return Batch(plan, source, key_types, stored_rows, current_rows)


def _refuse_stale(wh: Warehouse, plan: Plan, stale: int | None = None) -> None:
    """Rows hashed for other `check_cols` would be invisible to the merge: the load side
    (`pipeline.load.rehash`) rewrites them first, so finding one here is a bug, not data."""
    if stale is None:
        stale = int(wh.scalar(plan.stale_rows_sql(), plan.params) or 0)
    if stale:
        name, batch_id = plan.entity.name, plan.batch_id
        raise SnapshotError(
            f"{name}: {stale} row(s) of batch {batch_id} carry hashes of other check_cols;"
            " rehash the batch first (pipeline.load.rehash.ensure_current_hashes)",
            entity=name,
            batch=batch_id,
        )


def validate(wh: Warehouse, plan: Plan) -> tuple[int, int]:
    """The batch's row count and digest; refuses NULL or repeated unique_key values."""
    rows, distinct, null_rows, digest = wh.query_rows(plan.validate_sql(), plan.params)[0]
    name, batch_id, key = plan.entity.name, plan.batch_id, list(plan.entity.unique_key)
    if null_rows:
        raise SnapshotError(
            f"{name}: {null_rows} row(s) of batch {batch_id} have a NULL unique_key column {key}",
            entity=name,
            batch=batch_id,
        )
    if (distinct or 0) != rows:  # 18.16: NULL over no rows; fingerprints may clash
        dupes = wh.query_rows(plan.repeated_keys_sql(), plan.params)
        if dupes:
            raise SnapshotError(
                f"{name}: unique_key value(s) appear more than once in batch"
                f" {batch_id}, e.g. {[d[0] if len(d) == 2 else d[:-1] for d in dupes]}",
                entity=name,
                batch=batch_id,
            )
    return int(rows), int(digest or 0)


def unchanged(wh: Warehouse, plan: Plan, rows: int, digest: int) -> bool:
    """Whether a full scan holds exactly the live current (key, hash) pairs.

    Same count and same digest: then nothing opens, closes or retires, and the two anti-joins
    of the diff are not needed. Sums of 64-bit fingerprints of different sets agree with odds
    of 2^-64, those of the change hash itself. Incremental batches hold a window, never the
    whole history, so they always take the exact path.
    """
    if not plan.has_raw or not plan.has_history or plan.entity.incremental:
        return False
    count, total = wh.query_rows(plan.live_digest_sql(), plan.params)[0]
    return int(count) == rows and int(total or 0) == digest


def changes(wh: Warehouse, plan: Plan) -> int:
    """How many rows the diff will see (batch or history side, whichever is larger)."""
    counts = [int(wh.scalar(sql, plan.params) or 0) for sql in plan.change_count_sqls()]
    return max(counts, default=0)


def bucket_counts(wh: Warehouse, plan: Plan, buckets: Buckets, rows: int) -> dict[int, int]:
    """The batch's rows per bucket."""
    if buckets.count == 1:
        return {0: rows}
    found = wh.query_rows(plan.bucket_counts_sql(buckets), plan.params)
    return {int(b): int(n) for b, n in found}


def park(
    wh: Warehouse, database: str, table: str, data: pa.Table, bucket: int, counts: dict[int, int]
) -> None:
    """Insert a bucket's share of a merge's result into a parking table, tagged `_bucket`."""
    import pyarrow as pa

    if data.num_rows:
        counts[bucket] = data.num_rows
        tagged = data.append_column(
            "_bucket", pa.repeat(pa.scalar(bucket, pa.uint32()), data.num_rows)
        )
        wh.insert_arrow(database, table, tagged)


class Pending:
    """A batch's diff parked in the warehouse, bucket by bucket, until every bucket is diffed.

    The delete guard needs the whole batch's count before anything is written, and the rows
    of opened versions are never pulled into Python: `write` copies them from the raw batch
    inside the warehouse. The check strategy opens every version at the batch time, so only
    the keys are parked, and not even those for a bucket whose every row opens (a first load).
    """

    def __init__(self, wh: Warehouse, batch: Batch, buckets: Buckets, batch_ts: datetime):
        self.wh, self.buckets = wh, buckets
        self.plan, self.entity = batch.plan, batch.plan.entity
        batch_literal = timestamp_sql(wh.features.datetime64, literal(batch_ts))
        self.sql = Parking(batch.plan, batch.key_types, wh.features.timestamp_type, batch_literal)
        self.opened: dict[int, int] = {}
        self.whole: set[int] = set()  # buckets whose every batch row opens a version
        self.closed: dict[int, int] = {}
        self.tombstones: dict[int, int] = {}
        self.created = False

    def open_whole(self, counts: dict[int, int]) -> None:
        """Every batch row of these buckets opens a version: nothing to diff or park."""
        self.opened.update(counts)
        self.whole.update(counts)

    def add(self, bucket: int, d: Diff) -> None:
        import pyarrow as pa

        if d.empty:
            return
        if not self.created:
            for sql in self.sql.create_sqls():
                self.wh.execute(sql)
            self.created = True
        parked = list(self.entity.unique_key)
        if self.sql.timestamped:
            parked += ["dbt_updated_at", "dbt_valid_from"]
        closed = d.closed.set_column(
            d.closed.column_names.index("_tombstone"),
            "_tombstone",
            d.closed.column("_tombstone").cast(pa.uint8()),
        )
        database = self.plan.names.database
        for table, data, counts in (
            (self.sql.open_table, d.opened.select(parked), self.opened),
            (self.sql.close_table, closed, self.closed),
        ):
            park(self.wh, database, table, data, bucket, counts)
        if d.tombstones:
            self.tombstones[bucket] = d.tombstones

    def write(self, source: list[str], bucket_rows: int) -> None:
        """Open, tombstone, then close; each step is idempotent, so a crash anywhere is safe.

        Each statement covers consecutive buckets up to `bucket_rows` parked rows, so a small
        change is one statement per step whatever the table size.
        """
        names = self.plan.names
        version = time.time_ns()
        params: dict[str, object] = {**self.plan.params, "v": version}
        stored = list(self.wh.columns(names.database, names.storage))
        columns = [c for c in source if c in stored]
        whole = sorted(b for b in self.opened if b in self.whole)
        if whole:  # one pass over the batch (a statement per group re-reads it), parts capped
            sql = self.sql.open_sql(columns, self.buckets.where_any(whole), None, bucket_rows)
            self.wh.execute(sql, params)
        partial = {b: n for b, n in self.opened.items() if b not in self.whole}
        for group in groups(partial, bucket_rows):
            self.wh.execute(self.sql.opens_of_parked(columns, group), params)
        failpoint("snapshot-after-open", f"{names.storage} batch {self.plan.batch_id}")
        for group in groups(self.tombstones, bucket_rows):
            sql = self.sql.copy_sql(group, stored, self.sql.tombstone_columns, "_tombstone = 1")
            self.wh.execute(sql, params)
        closing = {**params, "v": version + 1}
        for group in groups(self.closed, bucket_rows):
            self.wh.execute(self.sql.copy_sql(group, stored, self.sql.close_columns), closing)

    def touched_keys(self) -> str:
        """A subquery listing every key this batch opened or closed a version of."""
        whole = sorted(self.whole)
        sql = self.sql.touched_keys_sql(self.created, whole, self.buckets)
        return render(sql, self.plan.params)

    def drop(self) -> None:
        if self.created:
            for sql in self.sql.drop_sqls():
                self.wh.execute(sql)

    @property
    def result(self) -> tuple[int, int]:
        """Versions opened (tombstones included) and closed."""
        opened = sum(self.opened.values()) + sum(self.tombstones.values())
        return opened, sum(self.closed.values())


def diff_buckets(
    wh: Warehouse, plan: Plan, buckets: Buckets, spec: Spec, pending: Pending, batch_ts: datetime
) -> int:
    """Diff every bucket and park the result; returns how many live keys the batch retires.

    The delete guard is the caller's, over the whole batch: each bucket sees only a share.
    """
    import pyarrow as pa

    retired = 0
    for bucket in range(buckets.count):
        where = buckets.where(bucket)
        incoming = wh.query_arrow(plan.incoming_sql(where), plan.params)
        current = wh.query_arrow(plan.current_or_empty_sql(where), plan.params)
        present = None
        if "_present" in current.column_names:
            listed = current.column("_present").cast(pa.bool_())
            present = current.filter(listed).select(list(spec.unique_key))
        ended_sql = plan.ended_sql(where) if incoming.num_rows else None
        ended: pa.Table | None = (
            wh.query_arrow(ended_sql, plan.params) if ended_sql is not None else None
        )
        d = diff(replace(spec, force_deletes=True), current, incoming, batch_ts, present, ended)
        pending.add(bucket, d)
        retired += d.retired
    return retired


def verify(
    wh: Warehouse, batch: Batch, pending: Pending, touched: int, live_before: int, bucket_rows: int
) -> None:
    """The invariants of what the batch touched (all of a first load in one aggregate)."""
    names, entity = batch.plan.names, batch.plan.entity
    problems: list[str] = []
    if touched and not batch.stored_rows:
        problems = first_load_violations(wh, names, entity, touched)
    elif touched:
        few = touched <= FULL_CHECK_SHARE * max(live_before, 1)
        keys = pending.touched_keys() if few else None
        problems = check_invariants(wh, names, entity, keys, bucket_rows)
    if problems:
        raise InvariantError(
            "SCD2 invariants broken:\n" + "\n".join(problems),
            entity=entity.name,
            batch=batch.plan.batch_id,
        )


def apply_batch(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch_id: str,
    force_deletes: bool = False,
    names: Names | None = None,
    bucket_rows: int = BUCKET_ROWS,
) -> StageResult:
    """Apply one loaded raw batch to the entity's history, in batch order.

    `names` redirects the writes (a rebuild replays history into a side table); the batch-order
    check then is the caller's business.
    """
    if names is None:
        names = Names.of(database, entity)
        if not check_order(wh, database, entity, batch_id):
            return StageResult()
    batch = prepare(wh, database, entity, batch_id, names)
    if batch is None:
        return StageResult()
    plan = batch.plan
    rows_in, digest = validate(wh, plan) if plan.has_raw else (0, 0)
    if unchanged(wh, plan, rows_in, digest):
        return StageResult(rows_in=rows_in)
    changed = rows_in if plan.opens_everything else changes(wh, plan)
    if not changed:
        return StageResult(rows_in=rows_in)
    # Python holds a bucket's changes; the warehouse's (key, hash) sets hold its whole table
    table_rows = max(rows_in, batch.current_rows) // SCAN_FACTOR
    buckets = Buckets.sized(max(changed, table_rows), bucket_rows, entity.unique_key)
    batch_ts = effective_time(wh, names, batch_id)
    pending = Pending(wh, batch, buckets, batch_ts)
    spec = spec_for(entity, force_deletes)
    try:
        if plan.opens_everything:
            pending.open_whole(bucket_counts(wh, plan, buckets, rows_in))
            retired = 0
        else:
            retired = diff_buckets(wh, plan, buckets, spec, pending, batch_ts)
        touched = sum(pending.opened.values()) + retired
        live_before = int(wh.scalar(plan.live_count_sql(), plan.params) or 0) if touched else 0
        check_delete_guard(spec, retired, live_before, batch_id)
        pending.write(batch.source, bucket_rows)
        verify(wh, batch, pending, touched, live_before, bucket_rows)
    finally:
        pending.drop()
    opened, closed = pending.result
    return StageResult(
        rows_in=rows_in, rows_out=opened, versions_opened=opened, versions_closed=closed
    )
