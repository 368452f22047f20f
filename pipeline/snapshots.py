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

from pipeline.config import ConfigError, Entity, check_columns
from pipeline.raw import META_COLUMNS, check_signature, ensure_check_columns
from pipeline.scd2 import (
    TS,
    Diff,
    SnapshotError,
    Spec,
    check_delete_guard,
    diff,
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
from pipeline.warehouse.base import render

if TYPE_CHECKING:
    import pyarrow as pa

INTERNAL = ("_hash", "_opened_by", "_closed_by", "_version")
STAGE = "snapshot"
# keys per merge bucket: bounds the memory of a merge (`[cdc] merge_bucket_rows`)
BUCKET_ROWS = 100_000
# a bucket's warehouse anti-join covers at most this many times `merge_bucket_rows` keys
SCAN_FACTOR = 10


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


def check_valid_to_current(wh: Warehouse, entity: Entity) -> None:
    """Refuse a `dbt_valid_to_current` the warehouse's timestamps cannot hold: ClickHouse would
    show every current version as 1970-01-01 instead."""
    value = entity.valid_to_current
    if value is not None and not wh.holds_timestamp(value):
        features = wh.features
        raise ConfigError(
            f"[entity.{entity.name}] dbt_valid_to_current = {value} is outside what the"
            f" warehouse's {features.timestamp_type} holds ({features.timestamp_range} UTC);"
            " current versions would read 1970-01-01"
        )


def view_columns(wh: Warehouse, names: Names, entity: Entity) -> list[tuple[str, str]]:
    """(public name, expression) of each view column: meta columns renamed as configured."""
    columns = []
    for column in wh.columns(names.database, names.storage):
        if column in INTERNAL:
            continue
        expression = quote_ident(column)
        if column == "dbt_valid_to" and entity.valid_to_current:
            value = entity.valid_to_current
            far = literal(value if wh.features.datetime64 else value.partition(".")[0])
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

    @property
    def of_key(self) -> str:
        """The bucket of a row's key, in SQL."""
        return f"modulo({key_fingerprint(self.keys)}, {self.count})"

    def where(self, bucket: int) -> str:
        """A SQL condition that keeps the keys of `bucket`."""
        if self.count == 1:
            return "1"
        return self.where_any([bucket])

    def where_any(self, buckets: list[int]) -> str:
        """A SQL condition that keeps the keys of any of `buckets`."""
        if self.count == 1 or len(buckets) == self.count:
            return "1"
        return f"{self.of_key} IN ({_ints(buckets)})"


def raw_schema(wh: Warehouse, database: str, entity: Entity, columns: list[str]) -> pa.Schema:
    """The Arrow types of raw columns, as the warehouse returns them (no rows are read)."""
    select = ", ".join(quote_ident(c) for c in columns)
    table = qualified(database, entity.raw_table)
    return wh.query_arrow(f"SELECT {select} FROM {table} WHERE 0").schema


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


def key_fingerprint(keys: tuple[str, ...]) -> str:
    """The key as one number, in SQL; text first, so a widened key type keeps its fingerprint."""
    text = ", ".join(f"toString({quote_ident(k)})" for k in keys)
    return f"cityHash64({text})"


CURRENT = "_opened_by < %(b)s AND (_closed_by = '' OR _closed_by >= %(b)s)"


@dataclass(frozen=True)
class Reads:
    """The SQL that reads one bucket of a batch and of the history before it.

    The batch's change hashes were computed at load, so the warehouse compares (key, hash)
    pairs itself and only new, changed and vanished keys reach Python, where `diff` decides
    on the real keys. The warehouse compares a key by a 64-bit fingerprint (set lookups on
    numbers are several times faster than on strings): a clash can only let an extra row
    through to the exact diff, never hold a changed one back, except when fingerprint and
    change hash both clash at once. "Current" means current before this batch (see module
    docstring), so a rerun reads what the first run did.
    """

    wh: Warehouse
    names: Names
    entity: Entity
    batch_id: str
    has_raw: bool
    reconciled: bool
    has_history: bool

    @property
    def params(self) -> dict[str, str]:
        return {"b": self.batch_id, "s": check_signature(self.entity)}

    @property
    def keys(self) -> str:
        return ", ".join(quote_ident(k) for k in self.entity.unique_key)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.entity.unique_key)

    @property
    def live(self) -> str:
        if self.entity.hard_deletes == "new_record":
            return "ifNull(dbt_is_deleted, '') != 'True'"
        return "1"

    @property
    def retires(self) -> bool:
        """Whether vanished keys matter: deletes tracked and visible in this batch."""
        visible = not self.entity.incremental or self.reconciled
        return self.entity.hard_deletes != "ignore" and visible

    def raw_rows(self, where: str) -> str:
        raw = qualified(self.names.database, self.entity.raw_table)
        return f"FROM {raw} WHERE _batch_id = %(b)s AND _check_cols = %(s)s AND {where}"

    def history(self, where: str) -> str:
        return f"FROM {self.names.q_storage} FINAL WHERE {CURRENT} AND {where}"

    def changed_sql(self, where: str) -> str:
        """The batch's rows whose (key, hash) is not a live current version: new or changed."""
        cols = [self.keys, "_check_hash AS _hash"]
        if self.entity.strategy == "timestamp":
            assert self.entity.updated_at is not None
            cols.append(quote_ident(self.entity.updated_at))
        sql = f"SELECT {', '.join(cols)} {self.raw_rows(where)}"
        if not self.has_history:
            return sql
        return (
            f"{sql} AND ({self.fingerprint}, _check_hash) NOT IN"
            f" (SELECT {self.fingerprint}, _hash {self.history(where)} AND {self.live})"
        )

    def digest(self, hash_column: str) -> str:
        """One number for a set of (key, hash) pairs: a sum of their fingerprints."""
        return f"sum(cityHash64({self.fingerprint}, {hash_column}))"

    def validate(self) -> tuple[int, int]:
        """The batch's row count and digest; refuses NULL or repeated unique_key values."""
        nulls = " OR ".join(f"isNull({quote_ident(k)})" for k in self.entity.unique_key)
        rows, distinct, null_rows, digest = self.wh.query_rows(
            f"SELECT count(), uniqExact({self.fingerprint}), countIf({nulls}),"
            f" {self.digest('_check_hash')} {self.raw_rows('1')}",
            self.params,
        )[0]
        name = self.entity.name
        if null_rows:
            raise SnapshotError(
                f"{name}: {null_rows} row(s) of batch {self.batch_id} have a NULL unique_key"
                f" column {list(self.entity.unique_key)}"
            )
        if (distinct or 0) != rows:  # 18.16: NULL over no rows; fingerprints may clash
            dupes = self.wh.query_rows(
                f"SELECT {self.keys}, count() {self.raw_rows('1')} GROUP BY {self.keys}"
                " HAVING count() > 1 LIMIT 5",
                self.params,
            )
            if dupes:
                raise SnapshotError(
                    f"{name}: unique_key value(s) appear more than once in batch"
                    f" {self.batch_id}, e.g. {[d[0] if len(d) == 2 else d[:-1] for d in dupes]}"
                )
        return int(rows), int(digest or 0)

    def unchanged(self, rows: int, digest: int) -> bool:
        """Whether a full scan holds exactly the live current (key, hash) pairs.

        Same count and same digest: then nothing opens, closes or retires, and the two
        anti-joins of `changes` are not needed. Sums of 64-bit fingerprints of different sets
        agree with odds of 2^-64, those of the change hash itself. Incremental batches hold a
        window, never the whole history, so they always take the exact path.
        """
        if not self.has_raw or not self.has_history or self.entity.incremental:
            return False
        count, total = self.wh.query_rows(
            f"SELECT count(), {self.digest('_hash')} {self.history('1')} AND {self.live}",
            self.params,
        )[0]
        return int(count) == rows and int(total or 0) == digest

    @property
    def opens_everything(self) -> bool:
        """No current version and the check strategy: every batch row opens at the batch time."""
        return self.has_raw and not self.has_history and self.entity.strategy == "check"

    def bucket_counts(self, buckets: Buckets, rows: int) -> dict[int, int]:
        """The batch's rows per bucket."""
        if buckets.count == 1:
            return {0: rows}
        found = self.wh.query_rows(
            f"SELECT {buckets.of_key} AS b, count() {self.raw_rows('1')} GROUP BY b", self.params
        )
        return {int(b): int(n) for b, n in found}

    def incoming(self, where: str) -> pa.Table:
        if not self.has_raw:
            return self.wh.query_arrow(f"SELECT {self.keys} FROM {self.names.q_storage} WHERE 0")
        return self.wh.query_arrow(self.changed_sql(where), self.params)

    def current(self, where: str) -> pa.Table:
        """Current versions of keys the batch changed, and of live keys it no longer has.

        With a reconciliation key list, `_present` says which of them the source still has.
        """
        sql = self.current_sql(where)
        if sql is None:
            cols = ", ".join(self.current_columns)
            sql = f"SELECT {cols} FROM {self.names.q_storage} WHERE 0"
        return self.wh.query_arrow(sql, self.params)

    @property
    def current_columns(self) -> list[str]:
        """What the diff needs of a current version."""
        cols = [self.keys, "dbt_scd_id", "_hash"]
        if self.entity.strategy == "timestamp":
            cols += ["dbt_updated_at", "dbt_valid_from"]
        if self.entity.hard_deletes == "new_record":
            cols.append("dbt_is_deleted")
        return cols

    def changes(self) -> int:
        """How many rows the diff will see (batch or history side, whichever is larger).

        Counted by the warehouse over the whole batch: a no-change batch stops here, and the
        merge is bucketed by what reaches Python, not by the table's size.
        """
        counts = [
            int(self.wh.scalar(f"SELECT count() FROM ({sql})", self.params) or 0)
            for sql in (self.changed_sql("1") if self.has_raw else None, self.current_sql("1"))
            if sql is not None
        ]
        return max(counts, default=0)

    def current_sql(self, where: str) -> str | None:
        """The query `current` runs; None when no current version can matter."""
        cols = self.current_columns
        present = None
        if self.retires and self.reconciled:
            from pipeline.raw import keys_table

            listed = qualified(self.names.database, keys_table(self.entity))
            present = (
                f"({self.keys}) IN (SELECT {self.keys} FROM {listed}"
                f" WHERE _batch_id = %(b)s AND {where})"
            )
            cols.append(f"{present} AS _present")
        wanted = []
        if self.has_raw:
            in_batch = f"{self.fingerprint} IN (SELECT {self.fingerprint} {self.raw_rows(where)})"
            differs = (
                f"({self.fingerprint}, _hash) NOT IN"
                f" (SELECT {self.fingerprint}, _check_hash {self.raw_rows(where)})"
            )
            if not self.retires:
                wanted.append(f"{differs} AND {in_batch}")
            elif present is not None:
                wanted.append(f"{differs} AND ({in_batch} OR NOT {present})")
            else:
                wanted.append(differs)  # changed or vanished
            if self.entity.hard_deletes == "new_record":  # the tombstone of a key that is back
                wanted.append(f"NOT ({self.live}) AND {in_batch}")
        elif self.retires:  # no raw table: everything vanished
            wanted.append(self.live if present is None else f"{self.live} AND NOT {present}")
        if not wanted or not self.has_history:
            return None
        return f"SELECT {', '.join(cols)} {self.history(where)} AND ({' OR '.join(wanted)})"

    def ended(self, where: str) -> pa.Table | None:
        """Last `dbt_valid_to` of the changed keys whose history has closed versions.

        Only the timestamp strategy with hard_deletes = invalidate needs it: there a key can
        come back with an old `updated_at` and no current version to compare with.
        """
        entity = self.entity
        if entity.strategy != "timestamp" or entity.hard_deletes != "invalidate":
            return None
        return self.wh.query_arrow(
            f"SELECT {self.keys}, max(dbt_valid_to) AS last_valid_to"
            f" FROM {self.names.q_storage} FINAL"
            " WHERE _opened_by < %(b)s AND _closed_by != '' AND _closed_by < %(b)s"
            f" AND {where} AND ({self.keys}) IN (SELECT {self.keys}"
            f" FROM ({self.changed_sql(where)})) GROUP BY {self.keys}",
            self.params,
        )

    def live_count(self) -> int:
        """Live keys before this batch: what the delete guard weighs a retirement against."""
        return int(
            self.wh.scalar(
                f"SELECT count() {self.history('1')} AND {self.live}",
                self.params,
            )
            or 0
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


def scd_id_sql(keys: tuple[str, ...], valid_from: str) -> str:
    """dbt_scd_id in SQL: md5 hex of (key text, '|', valid_from text), the shape of dbt's ids.

    Computed by the warehouse so that opened rows never pass through Python. Composite keys
    are length-prefixed, so ('ab','c') and ('a','bc') get different ids.
    """
    texts = [f"toString(assumeNotNull({quote_ident(k)}))" for k in keys]
    if len(texts) == 1:
        key = texts[0]
    else:
        key = "concat(" + ", ".join(f"toString(length({t})), ':', {t}, ';'" for t in texts) + ")"
    return f"lower(hex(MD5(concat({key}, '|', toString({valid_from})))))"


class Pending:
    """A batch's diff parked in the warehouse, bucket by bucket, until every bucket is diffed.

    The delete guard needs the whole batch's count before anything is written, and the rows
    of opened versions are never pulled into Python: `write` copies them from the raw batch
    inside the warehouse. The check strategy opens every version at the batch time, so only
    the keys are parked, and not even those for a bucket whose every row opens (a first load).
    """

    def __init__(
        self,
        reads: Reads,
        buckets: Buckets,
        key_types: dict[str, str],
        batch_ts: datetime,
    ):
        self.reads, self.buckets, self.key_types = reads, buckets, key_types
        self.wh, self.names, self.entity = reads.wh, reads.names, reads.entity
        self.batch_ts = _to_ts(self.wh, literal(batch_ts))
        self.open_table = f"{self.names.storage}__open"
        self.close_table = f"{self.names.storage}__close"
        self.opened: dict[int, int] = {}
        self.whole: set[int] = set()  # buckets whose every batch row opens a version
        self.closed: dict[int, int] = {}
        self.tombstones: dict[int, int] = {}
        self.created = False

    def q(self, table: str) -> str:
        return qualified(self.names.database, table)

    @property
    def key_list(self) -> str:
        return self.reads.keys

    @property
    def timestamped(self) -> bool:
        return self.entity.strategy == "timestamp"

    def _create(self) -> None:
        ts = self.wh.features.timestamp_type
        keys = ", ".join(f"{quote_ident(k)} {t}" for k, t in self.key_types.items())
        opened = f", dbt_updated_at {ts}, dbt_valid_from {ts}" if self.timestamped else ""
        tables = {
            self.open_table: f"{keys}{opened}",
            self.close_table: f"{keys}, dbt_scd_id String, _new_valid_to {ts}, _tombstone UInt8",
        }
        for table, columns in tables.items():
            self.wh.execute(f"DROP TABLE IF EXISTS {self.q(table)}")
            self.wh.execute(
                f"CREATE TABLE {self.q(table)} ({columns}, _bucket UInt32) ENGINE = Log"
            )
        self.created = True

    def open_whole(self, counts: dict[int, int]) -> None:
        """Every batch row of these buckets opens a version: nothing to diff or park."""
        self.opened.update(counts)
        self.whole.update(counts)

    def add(self, bucket: int, d: Diff) -> None:
        import pyarrow as pa

        if d.empty:
            return
        if not self.created:
            self._create()
        parked = list(self.entity.unique_key)
        if self.timestamped:
            parked += ["dbt_updated_at", "dbt_valid_from"]
        closed = d.closed.set_column(
            d.closed.column_names.index("_tombstone"),
            "_tombstone",
            d.closed.column("_tombstone").cast(pa.uint8()),
        )
        for table, data, counts in (
            (self.open_table, d.opened.select(parked), self.opened),
            (self.close_table, closed, self.closed),
        ):
            if data.num_rows:
                counts[bucket] = data.num_rows
                tagged = data.append_column(
                    "_bucket", pa.repeat(pa.scalar(bucket, pa.uint32()), data.num_rows)
                )
                self.wh.insert_arrow(self.names.database, table, tagged)
        tombstones = d.tombstones
        if tombstones:
            self.tombstones[bucket] = tombstones

    def write(self, source: list[str], bucket_rows: int) -> None:
        """Open, tombstone, then close; each step is idempotent, so a crash anywhere is safe.

        Each statement covers consecutive buckets up to `bucket_rows` parked rows, so a small
        change is one statement per step whatever the table size.
        """
        version = time.time_ns()
        stored = list(self.wh.columns(self.names.database, self.names.storage))
        columns = [c for c in source if c in stored]
        whole = {b: n for b, n in self.opened.items() if b in self.whole}
        for group in _groups(whole, bucket_rows):  # a statement's memory grows with its rows
            self._open(columns, version, self.buckets.where_any(group), None)
        partial = {b: n for b, n in self.opened.items() if b not in self.whole}
        for group in _groups(partial, bucket_rows):
            parked = f"FROM {self.q(self.open_table)} WHERE _bucket IN ({_ints(group)})"
            self._open(
                columns, version, f"({self.key_list}) IN (SELECT {self.key_list} {parked})", parked
            )
        failpoint("snapshot-after-open", f"{self.names.storage} batch {self.reads.batch_id}")
        keys = self.entity.unique_key
        tombstone = {
            "dbt_scd_id": scd_id_sql(keys, "_new_valid_to"),
            "dbt_updated_at": "_new_valid_to",
            "dbt_valid_from": "_new_valid_to",
            "dbt_valid_to": "NULL",
            "dbt_is_deleted": "'True'",
            "_opened_by": "%(b)s",
            "_closed_by": "''",
            "_version": "%(v)s",
        }
        close = {"dbt_valid_to": "_new_valid_to", "_closed_by": "%(b)s", "_version": "%(v)s"}
        batch_id = self.reads.batch_id
        for group in _groups(self.tombstones, bucket_rows):
            self._copy(group, stored, tombstone, {"b": batch_id, "v": version}, "_tombstone = 1")
        for group in _groups(self.closed, bucket_rows):
            self._copy(group, stored, close, {"b": batch_id, "v": version + 1})

    def _open(self, columns: list[str], version: int, rows: str, parked: str | None) -> None:
        """INSERT the batch's rows that open versions, with their meta columns, in one statement.

        `parked` (timestamp strategy) supplies each key's validity start; the check strategy
        opens every version at the batch time.
        """
        meta = {
            "dbt_updated_at": self.batch_ts,
            "dbt_valid_from": self.batch_ts,
            "_hash": "_check_hash",
            "dbt_valid_to": "NULL",
            "_opened_by": "%(b)s",
            "_closed_by": "''",
            "_version": "%(v)s",
        }
        meta["dbt_scd_id"] = scd_id_sql(self.entity.unique_key, meta["dbt_valid_from"])
        if self.entity.hard_deletes == "new_record":
            meta["dbt_is_deleted"] = "'False'"
        source = ", ".join(quote_ident(c) for c in columns)
        raw = f"SELECT {source}, _check_hash {self.reads.raw_rows(rows)}"
        if self.timestamped:
            assert parked is not None
            meta.update(
                dbt_updated_at="_p_updated_at",
                dbt_valid_from="_p_valid_from",
                dbt_scd_id=scd_id_sql(self.entity.unique_key, "_p_valid_from"),
            )
            raw = (
                f"({raw}) AS r ANY INNER JOIN (SELECT {self.key_list},"
                f" dbt_updated_at AS _p_updated_at, dbt_valid_from AS _p_valid_from {parked})"
                f" AS p USING ({self.key_list})"
            )
        else:
            raw = f"({raw})"
        target = [*columns, *meta]
        self.wh.execute(
            f"INSERT INTO {self.names.q_storage} ({', '.join(map(quote_ident, target))})"
            f" SELECT {', '.join([*map(quote_ident, columns), *meta.values()])} FROM {raw}",
            {**self.reads.params, "v": version},
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
            f" ANY INNER JOIN (SELECT dbt_scd_id, _new_valid_to {parked}) AS c"
            " USING (dbt_scd_id)",
            params,
        )

    def touched_keys(self) -> str:
        """A subquery listing every key this batch opened or closed a version of."""
        parts = []
        if self.created:
            parts += [
                f"SELECT {self.key_list} FROM {self.q(self.open_table)}",
                f"SELECT {self.key_list} FROM {self.q(self.close_table)}",
            ]
        if self.whole:
            where = self.buckets.where_any(sorted(self.whole))
            parts.append(f"SELECT {self.key_list} {self.reads.raw_rows(where)}")
        return " UNION ALL ".join(parts)

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
    check_valid_to_current(wh, entity)
    types = wh.columns(database, entity.raw_table if has_raw else names.storage)
    source = [c for c in types if c not in META_COLUMNS] if has_raw else []
    if has_raw:
        check_columns(entity, source, f"raw table {database}.{entity.raw_table}")
    key_types = {k: types[k] for k in entity.unique_key}
    if has_raw:
        ensure_check_columns(wh, database, entity, types)
        if _stale(wh, database, entity, batch_id):
            rehash(wh, database, entity, batch_id, bucket_rows)
        ensure_storage(wh, names, entity, raw_schema(wh, database, entity, source))
    spec = spec_for(entity, force_deletes)
    stored_rows, current_rows = _count_versions(wh, names)
    reads = Reads(
        wh,
        names,
        entity,
        batch_id,
        has_raw,
        reconciled(wh, database, entity, batch_id),
        has_history=current_rows > 0,
    )
    rows_in, digest = reads.validate() if has_raw else (0, 0)
    if reads.unchanged(rows_in, digest):
        return StageResult(rows_in=rows_in)
    changes = rows_in if reads.opens_everything else reads.changes()
    if not changes:
        return StageResult(rows_in=rows_in)
    # Python holds a bucket's changes; the warehouse's (key, hash) sets hold its whole table
    table_rows = max(rows_in, current_rows) // SCAN_FACTOR
    buckets = Buckets.sized(max(changes, table_rows), bucket_rows, entity.unique_key)
    batch_ts = effective_time(wh, names, batch_id)
    pending = Pending(reads, buckets, key_types, batch_ts)
    try:
        if reads.opens_everything:
            pending.open_whole(reads.bucket_counts(buckets, rows_in))
            retired = 0
        else:
            retired = diff_buckets(reads, buckets, spec, pending, batch_ts)
        touched = sum(pending.opened.values()) + retired
        live_before = reads.live_count() if touched else 0
        check_delete_guard(spec, retired, live_before, batch_id)
        pending.write(source, bucket_rows)
        problems: list[str] = []
        if touched and not stored_rows:
            problems = first_load_violations(wh, names, entity, touched)
        elif touched:
            few = touched <= FULL_CHECK_SHARE * max(live_before, 1)
            keys = render(pending.touched_keys(), reads.params) if few else None
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


def first_load_violations(wh: Warehouse, names: Names, entity: Entity, rows: int) -> list[str]:
    """Invariants of a history this batch started: `rows` keys, one current version each.

    Single versions have no windows to overlap, so one aggregate over the stored rows proves
    what reading every version back would. Only a mismatch reads them, to name the keys (or
    to clear a fingerprint clash, which can only lower the distinct count).
    """
    count, distinct, current = wh.query_rows(
        f"SELECT count(), uniqExact({key_fingerprint(entity.unique_key)}),"
        f" countIf(isNull(dbt_valid_to)) FROM {names.q_storage}"
    )[0]
    if count == distinct == current == rows:
        return []
    problems = check_invariants(wh, names, entity)
    if problems or count == current == rows:
        return problems
    return [
        f"{entity.name}: a first load of {rows} keys left {count} version(s) of {distinct}"
        f" key(s), {current} current"
    ]


def diff_buckets(
    reads: Reads, buckets: Buckets, spec: Spec, pending: Pending, batch_ts: datetime
) -> int:
    """Diff every bucket and park the result; returns how many live keys the batch retires.

    The delete guard is the caller's, over the whole batch: each bucket sees only a share.
    """
    import pyarrow as pa

    retired = 0
    for bucket in range(buckets.count):
        where = buckets.where(bucket)
        incoming = reads.incoming(where)
        current = reads.current(where)
        present = None
        if "_present" in current.column_names:
            listed = current.column("_present").cast(pa.bool_())
            present = current.filter(listed).select(list(spec.unique_key))
        d = diff(
            replace(spec, force_deletes=True),
            current,
            incoming,
            batch_ts,
            present,
            reads.ended(where) if incoming.num_rows else None,
        )
        pending.add(bucket, d)
        retired += d.retired
    return retired


def rehash(
    wh: Warehouse, database: str, entity: Entity, batch_id: str, bucket_rows: int = BUCKET_ROWS
) -> bool:
    """Give a batch the change hashes of the entity's current `check_cols`, if it lacks them.

    Loads hash the configured columns; after a `check_cols` change (or for raw rows loaded
    before hashes were stored) the batch is copied with new hashes, then the old copy goes.
    The fullest old copy is the source, and a half-written new copy from a crash is dropped
    first, so a crash anywhere leaves a batch that a rerun completes. Returns whether it ran.
    """
    from pipeline.raw import discard_rows, with_check_hash

    table = qualified(database, entity.raw_table)
    signature = check_signature(entity)
    params = {"b": batch_id, "s": signature}
    copies = dict(
        wh.query_rows(
            f"SELECT _check_cols, count() FROM {table} WHERE _batch_id = %(b)s"
            " GROUP BY _check_cols",
            params,
        )
    )
    if set(copies) <= {signature}:
        return False
    if signature in copies:
        discard_rows(
            wh, database, entity.raw_table, "_batch_id = %(b)s AND _check_cols = %(s)s", params
        )
        del copies[signature]
    old = max(copies, key=lambda c: copies[c])
    columns = [
        c for c in wh.columns(database, entity.raw_table) if c not in ("_check_hash", "_check_cols")
    ]
    buckets = Buckets.sized(copies[old], bucket_rows, entity.unique_key)
    select = ", ".join(quote_ident(c) for c in columns)
    for bucket in range(buckets.count):
        part = wh.query_arrow(
            f"SELECT {select} FROM {table} WHERE _batch_id = %(b)s AND _check_cols = %(o)s"
            f" AND {buckets.where(bucket)}",
            {**params, "o": old},
        )
        if part.num_rows:
            wh.insert_arrow(database, entity.raw_table, with_check_hash(part, entity))
    discard_rows(
        wh, database, entity.raw_table, "_batch_id = %(b)s AND _check_cols != %(s)s", params
    )
    return True


def _stale(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> bool:
    """Whether any row of the batch lacks hashes of the current `check_cols`."""
    return bool(
        wh.scalar(
            f"SELECT count() FROM {qualified(database, entity.raw_table)}"
            " WHERE _batch_id = %(b)s AND _check_cols != %(s)s",
            {"b": batch_id, "s": check_signature(entity)},
        )
    )


def _count_versions(wh: Warehouse, names: Names) -> tuple[int, int]:
    """All stored versions, and those not known to be closed (at least the current ones)."""
    stored, current = wh.query_rows(
        f"SELECT count(), countIf(_closed_by = '') FROM {names.q_storage}"
    )[0]
    return int(stored), int(current or 0)


__all__ = ["TS", "Names", "apply_batch", "batch_time", "check_invariants", "rehash", "spec_for"]
