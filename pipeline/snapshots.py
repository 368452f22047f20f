"""Snapshot stage: apply one raw batch to an entity's SCD2 history in the warehouse.

Storage is `<name>_snapshot__versions`, a ReplacingMergeTree keyed by (unique_key,
dbt_valid_from): closing a version re-inserts it with `dbt_valid_to` set and a higher `_version`,
so nothing is ever UPDATEd. `<name>_snapshot` is a view over it with FINAL, so a plain SELECT
returns exact history at any moment, even in the middle of a run.

A rerun of a crashed batch is exact because the "before" state is read by batch ids
(`_opened_by < batch`, `_closed_by` empty or >= batch), so the crashed attempt's own writes are
invisible to the diff, and writing the same rows again is absorbed by the merge key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.scd2 import (
    TS,
    Diff,
    SnapshotError,
    Spec,
    check_delete_guard,
    diff,
    hash_columns,
    invariant_violations,
)
from pipeline.state import StageResult, failpoint, last_done
from pipeline.warehouse import (
    Warehouse,
    arrow_to_clickhouse,
    literal,
    qualified,
    quote_ident,
)

if TYPE_CHECKING:
    import pyarrow as pa

INTERNAL = ("_hash", "_opened_by", "_closed_by", "_version")
RAW_META = ("_batch_id", "_loaded_at", "_row_hash")
STAGE = "snapshot"
# keys per merge bucket: bounds the memory of a merge (`[cdc] merge_bucket_rows`)
BUCKET_ROWS = 100_000


class InvariantError(SnapshotError):
    """The history broke an SCD2 invariant; the message names the keys."""


@dataclass(frozen=True)
class Names:
    """Where a snapshot lives; side tables (rebuilds, adoptions) have no view of their own."""

    database: str
    view: str | None
    storage: str

    @classmethod
    def of(cls, database: str, entity: Entity) -> Names:
        return cls(database, entity.snapshot_table, f"{entity.snapshot_table}__versions")

    @property
    def q_storage(self) -> str:
        return qualified(self.database, self.storage)

    @property
    def q_view(self) -> str:
        assert self.view is not None
        return qualified(self.database, self.view)


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


def batch_time(batch_id: str) -> datetime:
    """The time a batch id encodes (YYYYMMDDTHHMMSS[ffffff]Z): the snapshot's 'now'."""
    digits = batch_id.rstrip("Z")
    try:
        base = datetime.strptime(digits[:15], "%Y%m%dT%H%M%S")
        micros = int(digits[15:].ljust(6, "0")[:6]) if len(digits) > 15 else 0
    except ValueError as exc:
        raise SnapshotError(f"batch id {batch_id!r} is not YYYYMMDDTHHMMSS[ffffff]Z") from exc
    return base.replace(microsecond=micros, tzinfo=UTC)


def ensure_storage(wh: Warehouse, names: Names, entity: Entity, schema: pa.Schema) -> None:
    """Create storage + view on first use; add new source columns to both later."""
    import pyarrow as pa

    wh.create_database(names.database)
    ts = wh.features.timestamp_type
    if not wh.table_exists(names.database, names.storage):
        cols = [
            f"{quote_ident(f.name)} "
            f"{arrow_to_clickhouse(f.type, wh.features, nullable=f.name not in entity.unique_key)}"
            for f in schema
        ]
        meta = [
            "`dbt_scd_id` String",
            f"`dbt_updated_at` {ts}",
            f"`dbt_valid_from` {ts}",
            f"`dbt_valid_to` Nullable({ts})",
        ]
        if entity.hard_deletes == "new_record":
            meta.append("`dbt_is_deleted` Nullable(String)")
        meta += [
            "`_hash` UInt64",
            "`_opened_by` String",
            "`_closed_by` String",
            "`_version` UInt64",
        ]
        order = ", ".join(quote_ident(k) for k in entity.unique_key) + ", dbt_valid_from"
        wh.execute(
            f"CREATE TABLE IF NOT EXISTS {names.q_storage} ({', '.join(cols + meta)})"
            f" ENGINE = ReplacingMergeTree(_version) ORDER BY ({order})"
        )
    existing = wh.columns(names.database, names.storage)
    for field in schema:
        if field.name not in existing and not pa.types.is_null(field.type):
            wh.execute(
                f"ALTER TABLE {names.q_storage} ADD COLUMN {quote_ident(field.name)}"
                f" {arrow_to_clickhouse(field.type, wh.features)}"
            )
    if names.view is not None:
        ensure_view(wh, names, entity)


def view_columns(wh: Warehouse, names: Names, entity: Entity) -> list[tuple[str, str]]:
    """(public name, expression) of each view column: meta columns renamed as configured."""
    columns = []
    for column in wh.columns(names.database, names.storage):
        if column in INTERNAL:
            continue
        expression = quote_ident(column)
        if column == "dbt_valid_to" and entity.valid_to_current:
            far = literal(entity.valid_to_current)
            expression = f"ifNull(dbt_valid_to, {_to_ts(wh, far)})"
        columns.append((entity.meta_name(column), expression))
    return columns


def _to_ts(wh: Warehouse, text_literal: str) -> str:
    if wh.features.datetime64:
        return f"toDateTime64({text_literal}, 6, 'UTC')"
    return f"toDateTime({text_literal}, 'UTC')"


def ensure_view(wh: Warehouse, names: Names, entity: Entity) -> None:
    """(Re)create the public view when its columns changed (new source columns, renames)."""
    columns = view_columns(wh, names, entity)
    assert names.view is not None
    if wh.table_exists(names.database, names.view):
        if list(wh.columns(names.database, names.view)) == [name for name, _ in columns]:
            return
        wh.execute(f"DROP TABLE IF EXISTS {names.q_view}")
    select = ", ".join(
        expr if expr == quote_ident(name) else f"{expr} AS {quote_ident(name)}"
        for name, expr in columns
    )
    wh.execute(
        f"CREATE VIEW IF NOT EXISTS {names.q_view} AS SELECT {select} FROM {names.q_storage} FINAL"
    )


@dataclass(frozen=True)
class Buckets:
    """Split the keys into `count` groups by a hash of their text, the same on every table.

    A merge works one bucket at a time, so its memory is that of one bucket, whatever the
    table size. One bucket (the usual case) adds no condition at all.
    """

    count: int
    keys: tuple[str, ...]

    @classmethod
    def sized(cls, rows: int, bucket_rows: int, keys: tuple[str, ...]) -> Buckets:
        """About `bucket_rows` keys per bucket, never twice that: a table below twice the size
        stays one bucket (each extra bucket re-reads the batch and the current versions)."""
        return cls(max(1, rows // max(bucket_rows, 1)), keys)

    def where(self, bucket: int) -> str:
        """A SQL condition that keeps the keys of `bucket`."""
        if self.count == 1:
            return "1"
        text = ", ".join(f"toString({quote_ident(k)})" for k in self.keys)
        return f"modulo(cityHash64({text}), {self.count}) = {bucket}"


def diff_columns(spec: Spec, columns: list[str]) -> list[str]:
    """The raw columns the diff needs: key, hashed columns, `updated_at`; not the whole row."""
    wanted = set(hash_columns(spec, columns)) | set(spec.unique_key) | {spec.updated_at}
    return [c for c in columns if c in wanted]


def read_incoming(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch_id: str,
    columns: list[str],
    where: str = "1",
) -> pa.Table:
    select = ", ".join(quote_ident(c) for c in columns)
    return wh.query_arrow(
        f"SELECT {select} FROM {qualified(database, entity.raw_table)}"
        f" WHERE _batch_id = %(b)s AND {where}",
        {"b": batch_id},
    )


def reconciled(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> bool:
    """Whether this batch has a key list; an empty one proves nothing, so it retires nothing."""
    from pipeline.raw import keys_table

    table = keys_table(entity)
    if not entity.reconcile or not wh.table_exists(database, table):
        return False
    count = wh.scalar(
        f"SELECT count() FROM {qualified(database, table)} WHERE _batch_id = %(b)s",
        {"b": batch_id},
    )
    return bool(count)


def read_present_keys(
    wh: Warehouse, database: str, entity: Entity, batch_id: str, where: str = "1"
) -> pa.Table:
    """Every key the source had at this batch (reconciliation)."""
    from pipeline.raw import keys_table

    cols = ", ".join(quote_ident(k) for k in entity.unique_key)
    return wh.query_arrow(
        f"SELECT {cols} FROM {qualified(database, keys_table(entity))}"
        f" WHERE _batch_id = %(b)s AND {where}",
        {"b": batch_id},
    )


def read_ended(
    wh: Warehouse, names: Names, entity: Entity, batch_id: str, where: str = "1"
) -> pa.Table | None:
    """Last `dbt_valid_to` of every key with closed versions, before this batch.

    Only the timestamp strategy with hard_deletes = invalidate needs it: there a key can come
    back with an old `updated_at` and no current version to compare with.
    """
    if entity.strategy != "timestamp" or entity.hard_deletes != "invalidate":
        return None
    keys = ", ".join(quote_ident(k) for k in entity.unique_key)
    return wh.query_arrow(
        f"SELECT {keys}, max(dbt_valid_to) AS last_valid_to FROM {names.q_storage} FINAL"
        " WHERE _opened_by < %(b)s AND _closed_by != '' AND _closed_by < %(b)s"
        f" AND {where} GROUP BY {keys}",
        {"b": batch_id},
    )


def read_current(
    wh: Warehouse, names: Names, entity: Entity, batch_id: str, where: str = "1"
) -> pa.Table:
    """Each key's current version as it was before this batch (see module docstring)."""
    cols = [quote_ident(k) for k in entity.unique_key]
    cols += ["dbt_scd_id", "_hash"]
    if entity.strategy == "timestamp":
        cols += ["dbt_updated_at", "dbt_valid_from"]
    if entity.hard_deletes == "new_record":
        cols.append("dbt_is_deleted")
    return wh.query_arrow(
        f"SELECT {', '.join(cols)} FROM {names.q_storage} FINAL"
        f" WHERE _opened_by < %(b)s AND (_closed_by = '' OR _closed_by >= %(b)s) AND {where}",
        {"b": batch_id},
    )


def effective_time(wh: Warehouse, names: Names, batch_id: str) -> datetime:
    """The batch time at the warehouse's precision, strictly after every earlier version."""
    ts = batch_time(batch_id)
    step = timedelta(microseconds=1)
    if not wh.features.datetime64:
        ts = ts.replace(microsecond=0)
        step = timedelta(seconds=1)
    latest = wh.scalar(
        f"SELECT max(dbt_updated_at) FROM {names.q_storage} WHERE _opened_by < %(b)s",
        {"b": batch_id},
    )
    if isinstance(latest, datetime):
        latest = latest if latest.tzinfo else latest.replace(tzinfo=UTC)
        if latest.year > 1970 and ts <= latest:
            ts = latest + step
    return ts


OPEN_META = ("dbt_scd_id", "dbt_updated_at", "dbt_valid_from", "_hash", "dbt_is_deleted")


class Pending:
    """A batch's diff parked in the warehouse, bucket by bucket, until every bucket is diffed.

    The delete guard needs the whole batch's count before anything is written, and the rows
    of opened versions are never pulled into Python: `write` joins the raw batch with the
    parked keys and meta columns inside the warehouse.
    """

    def __init__(self, wh: Warehouse, names: Names, entity: Entity, key_types: dict[str, str]):
        self.wh, self.names, self.entity = wh, names, entity
        self.key_types = key_types
        self.open_table = f"{names.storage}__open"
        self.close_table = f"{names.storage}__close"
        self.opened: dict[int, int] = {}
        self.closed: dict[int, int] = {}
        self.tombstones: dict[int, int] = {}
        self.created = False

    def q(self, table: str) -> str:
        return qualified(self.names.database, table)

    @property
    def key_list(self) -> str:
        return ", ".join(quote_ident(k) for k in self.entity.unique_key)

    def _create(self) -> None:
        ts = self.wh.features.timestamp_type
        keys = ", ".join(f"{quote_ident(k)} {t}" for k, t in self.key_types.items())
        deleted = ", dbt_is_deleted Nullable(String)" if self._new_record else ""
        tables = {
            self.open_table: f"dbt_scd_id String, dbt_updated_at {ts}, dbt_valid_from {ts},"
            f" _hash UInt64{deleted}",
            self.close_table: f"dbt_scd_id String, _new_valid_to {ts}, _new_scd_id String",
        }
        for table, meta in tables.items():
            self.wh.execute(f"DROP TABLE IF EXISTS {self.q(table)}")
            self.wh.execute(
                f"CREATE TABLE {self.q(table)} ({keys}, {meta}, _bucket UInt32) ENGINE = Log"
            )
        self.created = True

    @property
    def _new_record(self) -> bool:
        return self.entity.hard_deletes == "new_record"

    def add(self, bucket: int, d: Diff) -> None:
        import pyarrow as pa

        if d.empty:
            return
        if not self.created:
            self._create()
        keys = list(self.entity.unique_key)
        opened = d.opened.select(keys + [c for c in OPEN_META if c in d.opened.column_names])
        for table, data, counts in (
            (self.open_table, opened, self.opened),
            (self.close_table, d.closed, self.closed),
        ):
            if data.num_rows:
                tagged = data.append_column(
                    "_bucket", pa.repeat(pa.scalar(bucket, pa.uint32()), data.num_rows)
                )
                self.wh.insert_arrow(self.names.database, table, tagged)
                counts[bucket] = data.num_rows
        tombstones = d.tombstones
        if tombstones:
            self.tombstones[bucket] = tombstones

    def write(self, raw: str, source: list[str], batch_id: str, bucket_rows: int) -> None:
        """Open, tombstone, then close; each step is idempotent, so a crash anywhere is safe.

        Each statement covers consecutive buckets up to `bucket_rows` parked rows, so a small
        change is one statement per step whatever the table size.
        """
        version = time.time_ns()
        stored = list(self.wh.columns(self.names.database, self.names.storage))
        columns = [c for c in source if c in stored]
        for group in _groups(self.opened, bucket_rows):
            self._open(raw, columns, batch_id, version, group)
        failpoint("snapshot-after-open", f"{self.names.storage} batch {batch_id}")
        tombstone = {
            "dbt_scd_id": "_new_scd_id",
            "dbt_updated_at": "_new_valid_to",
            "dbt_valid_from": "_new_valid_to",
            "dbt_valid_to": "NULL",
            "dbt_is_deleted": "'True'",
            "_opened_by": "%(b)s",
            "_closed_by": "''",
            "_version": "%(v)s",
        }
        close = {"dbt_valid_to": "_new_valid_to", "_closed_by": "%(b)s", "_version": "%(v)s"}
        for group in _groups(self.tombstones, bucket_rows):
            self._copy(group, stored, tombstone, {"b": batch_id, "v": version}, "_new_scd_id != ''")
        for group in _groups(self.closed, bucket_rows):
            self._copy(group, stored, close, {"b": batch_id, "v": version + 1})

    def _open(
        self, raw: str, columns: list[str], batch_id: str, version: int, group: list[int]
    ) -> None:
        """INSERT the batch's rows of opened keys, with their meta columns, in one statement."""
        meta = [c for c in OPEN_META if c != "dbt_is_deleted" or self._new_record]
        target = [*columns, *meta, "dbt_valid_to", "_opened_by", "_closed_by", "_version"]
        select = [*map(quote_ident, columns), *meta, "NULL", "%(b)s", "''", "%(v)s"]
        source = ", ".join(quote_ident(c) for c in columns)
        parked = f"FROM {self.q(self.open_table)} WHERE _bucket IN ({_ints(group)})"
        self.wh.execute(
            f"INSERT INTO {self.names.q_storage} ({', '.join(map(quote_ident, target))})"
            f" SELECT {', '.join(select)}"
            f" FROM (SELECT {source} FROM {qualified(self.names.database, raw)}"
            f" WHERE _batch_id = %(b)s AND ({self.key_list}) IN (SELECT {self.key_list} {parked}))"
            f" AS r ANY INNER JOIN (SELECT {self.key_list}, {', '.join(meta)} {parked}) AS p"
            f" USING ({self.key_list})",
            {"b": batch_id, "v": version},
        )

    def _copy(
        self,
        group: list[int],
        cols: list[str],
        overrides: dict[str, str],
        params: dict[str, object],
        only: str = "1",
    ) -> None:
        """Re-insert parked versions with some columns replaced (ReplacingMergeTree keeps it)."""
        select = ", ".join(overrides.get(c, quote_ident(c)) for c in cols)
        parked = f"FROM {self.q(self.close_table)} WHERE _bucket IN ({_ints(group)}) AND {only}"
        self.wh.execute(
            f"INSERT INTO {self.names.q_storage} ({', '.join(quote_ident(c) for c in cols)})"
            f" SELECT {select} FROM (SELECT * FROM {self.names.q_storage} FINAL"
            f" WHERE ({self.key_list}) IN (SELECT {self.key_list} {parked})) AS s"
            f" ANY INNER JOIN (SELECT dbt_scd_id, _new_valid_to, _new_scd_id {parked}) AS c"
            " USING (dbt_scd_id)",
            params,
        )

    def touched_keys(self) -> str:
        """A subquery listing every key this batch opened or closed a version of."""
        return (
            f"SELECT {self.key_list} FROM {self.q(self.open_table)}"
            f" UNION ALL SELECT {self.key_list} FROM {self.q(self.close_table)}"
        )

    def drop(self) -> None:
        if self.created:
            for table in (self.open_table, self.close_table):
                self.wh.execute(f"DROP TABLE IF EXISTS {self.q(table)}")


def _groups(counts: dict[int, int], rows: int) -> list[list[int]]:
    """Consecutive buckets with parked rows, grouped up to `rows` rows per statement."""
    groups: list[list[int]] = []
    size = 0
    for bucket in sorted(counts):
        if not groups or size + counts[bucket] > rows:
            groups.append([])
            size = 0
        groups[-1].append(bucket)
        size += counts[bucket]
    return groups


def _ints(values: list[int]) -> str:
    return ", ".join(str(int(v)) for v in values)


def check_invariants(
    wh: Warehouse,
    names: Names,
    entity: Entity,
    keys: str | None = None,
    bucket_rows: int = BUCKET_ROWS,
) -> list[str]:
    """Invariants of the whole history (bucket by bucket), or of the keys a subquery lists.

    Only keys a merge touched can break, so after a merge the check reads just those (a
    no-change run reads nothing); `python -m pipeline check` reads everything.
    """
    cols = [quote_ident(k) for k in entity.unique_key] + ["dbt_valid_from", "dbt_valid_to"]
    select = f"SELECT {', '.join(cols)} FROM {names.q_storage} FINAL"
    spec = spec_for(entity)
    if keys is not None:
        key_cols = ", ".join(quote_ident(k) for k in entity.unique_key)
        return invariant_violations(
            spec, wh.query_arrow(f"{select} WHERE ({key_cols}) IN ({keys})")
        )
    total = int(wh.scalar(f"SELECT count() FROM {names.q_storage}") or 0)
    buckets = Buckets.sized(total, bucket_rows, entity.unique_key)
    problems: list[str] = []
    for bucket in range(buckets.count):
        versions = wh.query_arrow(f"{select} WHERE {buckets.where(bucket)}")
        problems += invariant_violations(spec, versions)
    return problems


FULL_CHECK_SHARE = 0.2


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
        last = last_done(wh, database, entity.name, STAGE)
        if last == batch_id:
            return StageResult()  # applied already: re-applying changes nothing
        if last is not None and batch_id < last:
            raise SnapshotError(
                f"{entity.name}: batch {batch_id} is older than the last applied batch {last};"
                " batches apply in order"
            )
    has_raw = wh.table_exists(database, entity.raw_table)
    if not has_raw and not wh.table_exists(database, names.storage):
        return StageResult()
    # without a raw table (it was dropped) the batch is an empty extract: everything disappeared
    types = wh.columns(database, entity.raw_table if has_raw else names.storage)
    key_types = {k: types[k] for k in entity.unique_key}
    source = [c for c in types if c not in RAW_META] if has_raw else []
    if has_raw:
        schema = read_incoming(wh, database, entity, batch_id, source, "0").schema
        ensure_storage(wh, names, entity, schema)
    spec = spec_for(entity, force_deletes)
    narrow = diff_columns(spec, source)
    batch_ts = effective_time(wh, names, batch_id)
    buckets = Buckets.sized(
        max(
            _count_incoming(wh, database, entity, batch_id) if has_raw else 0,
            _count_current(wh, names),
        ),
        bucket_rows,
        entity.unique_key,
    )
    with_keys = reconciled(wh, database, entity, batch_id)
    pending = Pending(wh, names, entity, key_types)
    rows_in = live_before = retired = 0
    try:
        for bucket in range(buckets.count):
            where = buckets.where(bucket)
            if has_raw:
                incoming = read_incoming(wh, database, entity, batch_id, narrow, where)
            else:
                incoming = _empty_like_storage(wh, names, entity)
            d = diff(
                replace(spec, force_deletes=True),  # the guard counts the whole batch, below
                read_current(wh, names, entity, batch_id, where),
                incoming,
                batch_ts,
                read_present_keys(wh, database, entity, batch_id, where) if with_keys else None,
                read_ended(wh, names, entity, batch_id, where),
            )
            pending.add(bucket, d)
            rows_in += incoming.num_rows
            live_before += d.live_before
            retired += d.retired
        check_delete_guard(spec, retired, live_before)
        pending.write(entity.raw_table, source, batch_id, bucket_rows)
        touched = sum(pending.opened.values()) + retired
        if touched:
            few = touched <= FULL_CHECK_SHARE * max(live_before, 1)
            keys = pending.touched_keys() if few else None
            problems = check_invariants(wh, names, entity, keys, bucket_rows)
            if problems:
                raise InvariantError("SCD2 invariants broken:\n" + "\n".join(problems))
    finally:
        pending.drop()
    opened = sum(pending.opened.values()) + sum(pending.tombstones.values())
    return StageResult(
        rows_in=rows_in,
        rows_out=opened,
        versions_opened=opened,
        versions_closed=sum(pending.closed.values()),
    )


def _count_incoming(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> int:
    table = qualified(database, entity.raw_table)
    return int(wh.scalar(f"SELECT count() FROM {table} WHERE _batch_id = %(b)s", {"b": batch_id}))


def _count_current(wh: Warehouse, names: Names) -> int:
    """Versions not known to be closed: at least the current ones (sizes the buckets)."""
    return int(wh.scalar(f"SELECT count() FROM {names.q_storage} WHERE _closed_by = ''") or 0)


def _empty_like_storage(wh: Warehouse, names: Names, entity: Entity) -> pa.Table:
    """An empty batch with the key columns (an empty full extract: everything disappeared)."""
    cols = ", ".join(quote_ident(k) for k in entity.unique_key)
    return wh.query_arrow(f"SELECT {cols} FROM {names.q_storage} WHERE 0")


__all__ = ["TS", "Names", "apply_batch", "batch_time", "check_invariants", "spec_for"]
