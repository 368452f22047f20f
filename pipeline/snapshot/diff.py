"""The SCD Type 2 diff: a pure, vectorised function of (current versions, incoming batch).

No I/O here. `diff` says which versions to open, which to close and which deleted keys to
tombstone; `merge` reads the inputs from the warehouse and writes the outputs.
Semantics follow dbt snapshots (strategies `check` and `timestamp`, `hard_deletes`
ignore / invalidate / new_record) with change detection by xxhash (see hashing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core.errors import DeleteGuardError, SnapshotError
from pipeline.core.hashing import encode_key, row_hash

if TYPE_CHECKING:
    import pyarrow as pa

TS = ("us", "UTC")


@dataclass(frozen=True)
class Spec:
    entity: str
    unique_key: tuple[str, ...]
    strategy: str  # "check" | "timestamp"
    check_cols: tuple[str, ...] | None  # None = all source columns
    updated_at: str | None = None
    hard_deletes: str = "ignore"
    full_scan: bool = True  # deletes are only visible in full extracts
    delete_guard: float = 0.2
    force_deletes: bool = False


@dataclass(frozen=True)
class Diff:
    """What one batch changes; every table carries the unique_key columns.

    `opened` lists versions to open (from `dbt_valid_from`, with `dbt_updated_at`); `closed`
    lists versions to close at `_new_valid_to`, and `_tombstone` asks for a deletion version
    (hard_deletes = new_record) opening at that moment. Constant meta columns and `dbt_scd_id`
    are the writer's: it derives the id from (key, valid_from) in SQL.
    """

    opened: pa.Table  # incoming columns + _hash, dbt_updated_at, dbt_valid_from
    closed: pa.Table  # key, dbt_scd_id, _new_valid_to, _tombstone
    live_before: int
    retired: int

    @property
    def tombstones(self) -> int:
        import pyarrow.compute as pc

        return int(pc.sum(self.closed.column("_tombstone")).as_py() or 0)

    @property
    def empty(self) -> bool:
        return not (self.opened.num_rows or self.closed.num_rows)


def hash_columns(spec: Spec, columns: list[str]) -> list[str]:
    return list(spec.check_cols) if spec.check_cols is not None else columns


def _checked_keys(spec: Spec, incoming: pa.Table) -> pa.Array:
    """The batch's encoded keys; refuses a missing key column, NULL keys and repeated keys."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for k in spec.unique_key:
        if k not in incoming.column_names:
            raise SnapshotError(f"{spec.entity}: unique_key column {k!r} is not in the batch")
        nulls = incoming.column(k).null_count
        if nulls:
            raise SnapshotError(f"{spec.entity}: {nulls} row(s) have NULL unique_key column {k!r}")
    keys = encode_key(incoming, spec.unique_key)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        dupes = counts.filter(pc.greater(counts.field("counts"), 1))
        sample = [d["values"] for d in dupes.to_pylist()[:5]]
        raise SnapshotError(
            f"{spec.entity}: {len(dupes)} unique_key value(s) appear more than once in the batch,"
            f" e.g. {sample}"
        )
    return keys


def _match(left: pa.Array, right: pa.Array) -> pa.Array:
    """For each left key, the row index of the same key on the right (NULL if absent)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.index_in(left, value_set=right) if len(right) else pa.nulls(len(left), pa.int32())


def diff(
    spec: Spec,
    current: pa.Table,
    incoming: pa.Table,
    batch_ts: datetime,
    present: pa.Table | None = None,
    ended: pa.Table | None = None,
) -> Diff:
    """Versions to open and close so that history reflects `incoming` as of `batch_ts`.

    `incoming` holds the unique_key columns and either `_hash` or the hashed columns (and
    `updated_at` for the timestamp strategy).
    `current` holds the current version of each key (unique_key columns, dbt_scd_id, _hash,
    dbt_is_deleted when hard_deletes = new_record, and for the timestamp strategy
    dbt_updated_at and dbt_valid_from).
    `present` (reconciliation) lists every key the source still has, for incremental batches:
    live keys in neither `present` nor `incoming` are retired like keys missing from a full scan.
    `ended` (timestamp strategy with hard_deletes = invalidate) gives, for keys whose history
    ended, the last `dbt_valid_to` (column `last_valid_to`): a key that comes back with an
    `updated_at` at or before that moment opens its new version at the batch time instead, so
    windows never overlap.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    ts_type = pa.timestamp(*TS)
    batch = pa.scalar(batch_ts, ts_type)
    in_keys = _checked_keys(spec, incoming)
    if "_hash" in incoming.column_names:  # computed at load (raw `_check_hash`)
        in_hash = _combined(incoming.column("_hash"))
    else:
        in_hash = row_hash(incoming, hash_columns(spec, incoming.column_names))
    cur_keys = encode_key(current, spec.unique_key)
    if isinstance(cur_keys, pa.ChunkedArray):
        cur_keys = cur_keys.combine_chunks()
    cur_deleted = (
        pc.equal(current.column("dbt_is_deleted"), "True").fill_null(False)
        if "dbt_is_deleted" in current.column_names
        else pa.repeat(pa.scalar(False), current.num_rows)
    )

    idx = _match(in_keys, cur_keys)
    has_cur = pc.is_valid(idx)
    take = idx.fill_null(0) if current.num_rows else None

    def cur(column: str | pa.Array) -> pa.Array:
        values = current.column(column) if isinstance(column, str) else column
        if take is None:
            return pa.nulls(len(idx), values.type)
        return pc.if_else(has_cur, pc.take(values, take), pa.scalar(None, values.type))

    was_deleted = cur(cur_deleted).fill_null(False)
    if spec.strategy == "check":
        hash_changed = pc.not_equal(in_hash, cur("_hash")).fill_null(True)
        changed = pc.and_(has_cur, pc.or_(hash_changed, was_deleted))
        valid_from = pa.repeat(batch, incoming.num_rows)
        updated = valid_from
    else:
        assert spec.updated_at is not None
        new_ts = incoming.column(spec.updated_at).cast(ts_type)
        if isinstance(new_ts, pa.ChunkedArray):
            new_ts = new_ts.combine_chunks()
        cur_upd = cur("dbt_updated_at").cast(ts_type)
        newer = pc.greater(new_ts, cur_upd).fill_null(False)
        no_ts_change = pc.and_(
            pc.is_null(new_ts), pc.not_equal(in_hash, cur("_hash")).fill_null(True)
        )
        changed = pc.and_(has_cur, pc.or_(pc.or_(newer, no_ts_change), was_deleted))
        ts_or_batch = pc.coalesce(new_ts, batch)
        cur_from = cur("dbt_valid_from").cast(ts_type)
        bound = cur_from
        if ended is not None and ended.num_rows:
            ended_at = _match(in_keys, _combined(encode_key(ended, spec.unique_key)))
            last_to = pc.take(ended.column("last_valid_to").cast(ts_type), ended_at)
            bound = pc.coalesce(cur_from, last_to)
        after_current = pc.greater(ts_or_batch, bound).fill_null(True)
        valid_from = pc.if_else(after_current, ts_or_batch, batch)
        updated = pc.coalesce(new_ts, valid_from)

    opening = pc.or_(pc.invert(has_cur), changed)
    opened = incoming.drop_columns([c for c in ("_hash",) if c in incoming.column_names])
    opened = (
        opened.filter(opening)
        .append_column("_hash", pc.filter(in_hash, opening))
        .append_column("dbt_updated_at", pc.filter(updated, opening))
        .append_column("dbt_valid_from", pc.filter(valid_from, opening))
    )

    key = list(spec.unique_key)
    closed = incoming.select(key).filter(changed)
    closed = (
        closed.append_column("dbt_scd_id", pc.filter(cur("dbt_scd_id"), changed))
        .append_column("_new_valid_to", pc.filter(valid_from, changed))
        .append_column("_tombstone", pa.repeat(pa.scalar(False), closed.num_rows))
    )
    live = pc.invert(cur_deleted)
    live_before = pc.sum(live.cast(pa.int64())).as_py() or 0
    seen = in_keys
    if present is not None:
        present_keys = encode_key(present, spec.unique_key)
        seen = pa.concat_arrays([in_keys, _combined(present_keys)])
    gone = _retired(spec, current, cur_keys, seen, live, present is not None)
    retired = int(pc.sum(gone.cast(pa.int64())).as_py() or 0)
    if not spec.force_deletes:
        check_delete_guard(spec, retired, live_before)
    if retired:
        gone_to = pa.repeat(batch, retired)
        tombstone = pa.scalar(spec.hard_deletes == "new_record")
        closed = pa.concat_tables(
            [
                closed,
                current.select(key)
                .filter(gone)
                .cast(closed.select(key).schema)
                .append_column("dbt_scd_id", pc.filter(current.column("dbt_scd_id"), gone))
                .append_column("_new_valid_to", gone_to)
                .append_column("_tombstone", pa.repeat(tombstone, retired)),
            ]
        )
    return Diff(opened, closed, live_before, retired)


def _combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    import pyarrow as pa

    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _retired(
    spec: Spec,
    current: pa.Table,
    cur_keys: pa.Array,
    seen: pa.Array,
    live: pa.Array,
    reconciled: bool,
) -> pa.Array:
    """Mask of the live current keys missing from a full extract, when deletes are tracked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    visible = spec.full_scan or reconciled
    if spec.hard_deletes == "ignore" or not visible or not current.num_rows:
        return pa.repeat(pa.scalar(False), current.num_rows)
    return pc.and_(live, pc.invert(pc.is_in(cur_keys, value_set=seen)))


def check_delete_guard(spec: Spec, retired: int, live_before: int, batch_id: str = "") -> None:
    """Refuse to retire more than `delete_guard` of the live keys (a truncated extract?)."""
    if retired and retired > spec.delete_guard * live_before and not spec.force_deletes:
        batch = batch_id or "<batch id>"
        raise DeleteGuardError(
            f"{spec.entity}: this full extract would retire {retired} of {live_before} live keys"
            f" ({retired / live_before:.0%} > delete_guard {spec.delete_guard:.0%}); refusing."
            " If the source really lost them, apply the batch with the guard off:"
            f" luigi --module pipeline Snapshot --entity {spec.entity} --Snapshot-batch {batch}"
            f" --force-deletes --local-scheduler, then finish the batch: cdc-run --batch {batch}",
            entity=spec.entity,
            batch=batch_id or None,
        )


def spec_for(entity: Entity, force_deletes: bool = False) -> Spec:
    return Spec(
        entity=entity.name,
        unique_key=entity.unique_key,
        strategy=entity.strategy,
        check_cols=entity.check_cols,
        updated_at=entity.updated_at,
        hard_deletes=entity.hard_deletes,
        full_scan=not entity.incremental,
        delete_guard=entity.delete_guard,
        force_deletes=force_deletes,
    )
