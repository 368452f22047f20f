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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.scd2 import TS, Diff, SnapshotError, Spec, diff, invariant_violations
from pipeline.state import StageResult, failpoint, last_done
from pipeline.warehouse import (
    Warehouse,
    arrow_to_clickhouse,
    column_defs,
    literal,
    qualified,
    quote_ident,
)

if TYPE_CHECKING:
    import pyarrow as pa

INTERNAL = ("_hash", "_opened_by", "_closed_by", "_version")
RAW_META = ("_batch_id", "_loaded_at", "_row_hash")
STAGE = "snapshot"


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


def read_incoming(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> pa.Table:
    import pyarrow as pa

    if not wh.table_exists(database, entity.raw_table):
        return pa.table({})
    cols = [c for c in wh.columns(database, entity.raw_table) if c not in RAW_META]
    select = ", ".join(quote_ident(c) for c in cols)
    return wh.query_arrow(
        f"SELECT {select} FROM {qualified(database, entity.raw_table)} WHERE _batch_id = %(b)s",
        {"b": batch_id},
    )


def read_present_keys(
    wh: Warehouse, database: str, entity: Entity, batch_id: str
) -> pa.Table | None:
    """Every key the source had at this batch (reconciliation), or None when not reconciled."""
    from pipeline.raw import keys_table

    table = keys_table(entity)
    if not entity.reconcile or not wh.table_exists(database, table):
        return None
    cols = ", ".join(quote_ident(k) for k in entity.unique_key)
    keys = wh.query_arrow(
        f"SELECT {cols} FROM {qualified(database, table)} WHERE _batch_id = %(b)s",
        {"b": batch_id},
    )
    return keys if keys.num_rows else None  # an empty list proves nothing: retire nothing


def read_ended(wh: Warehouse, names: Names, entity: Entity, batch_id: str) -> pa.Table | None:
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
        f" GROUP BY {keys}",
        {"b": batch_id},
    )


def read_current(wh: Warehouse, names: Names, entity: Entity, batch_id: str) -> pa.Table:
    """Each key's current version as it was before this batch (see module docstring)."""
    cols = [quote_ident(k) for k in entity.unique_key]
    cols += ["dbt_scd_id", "_hash", "dbt_updated_at", "dbt_valid_from"]
    if entity.hard_deletes == "new_record":
        cols.append("dbt_is_deleted")
    return wh.query_arrow(
        f"SELECT {', '.join(cols)} FROM {names.q_storage} FINAL"
        " WHERE _opened_by < %(b)s AND (_closed_by = '' OR _closed_by >= %(b)s)",
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


def _write_opened(
    wh: Warehouse, names: Names, opened: pa.Table, batch_id: str, version: int
) -> None:
    import pyarrow as pa

    n = opened.num_rows
    if not n:
        return
    opened = opened.append_column("_opened_by", pa.array([batch_id] * n, pa.string()))
    opened = opened.append_column("_closed_by", pa.array([""] * n, pa.string()))
    opened = opened.append_column("_version", pa.array([version] * n, pa.uint64()))
    storage_cols = wh.columns(names.database, names.storage)
    keep = [c for c in opened.column_names if c in storage_cols]
    wh.insert_arrow(names.database, names.storage, opened.select(keep))


def _copy_versions(
    wh: Warehouse, names: Names, tmp: pa.Table, overrides: dict[str, str], params: dict[str, object]
) -> None:
    """INSERT ... SELECT storage rows joined to a temp table, with some columns replaced."""
    if not tmp.num_rows:
        return
    tmp_name = f"{names.storage}__tmp"
    q_tmp = qualified(names.database, tmp_name)
    wh.execute(f"DROP TABLE IF EXISTS {q_tmp}")
    ts = wh.features.timestamp_type
    defs = ", ".join(
        f"{quote_ident(c)} {ts if c.endswith(('valid_to', 'valid_from')) else 'String'}"
        for c in tmp.column_names
    )
    wh.execute(f"CREATE TABLE {q_tmp} ({defs}) ENGINE = Memory")
    try:
        wh.insert_arrow(names.database, tmp_name, tmp)
        cols = list(wh.columns(names.database, names.storage))
        select = ", ".join(overrides.get(c, quote_ident(c)) for c in cols)
        wh.execute(
            f"INSERT INTO {names.q_storage} ({', '.join(quote_ident(c) for c in cols)})"
            f" SELECT {select} FROM {names.q_storage} FINAL"
            f" ANY INNER JOIN {q_tmp} USING (dbt_scd_id)",
            params,
        )
    finally:
        wh.execute(f"DROP TABLE IF EXISTS {q_tmp}")


def write_diff(wh: Warehouse, names: Names, d: Diff, batch_id: str) -> None:
    """Open, tombstone, then close; each step is idempotent, so a crash anywhere is safe."""

    version = time.time_ns()
    _write_opened(wh, names, d.opened, batch_id, version)
    failpoint("snapshot-after-open", f"{names.storage} batch {batch_id}")
    _copy_versions(
        wh,
        names,
        d.tombstones,
        {
            "dbt_scd_id": "_new_scd_id",
            "dbt_updated_at": "_new_valid_from",
            "dbt_valid_from": "_new_valid_from",
            "dbt_valid_to": "NULL",
            "dbt_is_deleted": "'True'",
            "_opened_by": "%(b)s",
            "_closed_by": "''",
            "_version": "%(v)s",
        },
        {"b": batch_id, "v": version},
    )
    _copy_versions(
        wh,
        names,
        d.closed,
        {"dbt_valid_to": "_new_valid_to", "_closed_by": "%(b)s", "_version": "%(v)s"},
        {"b": batch_id, "v": version + 1},
    )


def check_invariants(
    wh: Warehouse, names: Names, entity: Entity, keys: pa.Table | None = None
) -> list[str]:
    """Invariants of the whole history, or of the given keys' histories only.

    Only keys a merge touched can break, so after a merge the check reads just those (a
    no-change run reads nothing); `python -m pipeline check` reads everything. The keys travel
    in a temporary Memory table: an IN list of literals would outgrow max_query_size.
    """
    cols = [quote_ident(k) for k in entity.unique_key] + ["dbt_valid_from", "dbt_valid_to"]
    select = f"SELECT {', '.join(cols)} FROM {names.q_storage} FINAL"
    if keys is None:
        return invariant_violations(spec_for(entity), wh.query_arrow(select))
    if keys.num_rows == 0:
        return []
    tmp = f"{names.storage}__check"
    q_tmp = qualified(names.database, tmp)
    key_cols = ", ".join(quote_ident(k) for k in entity.unique_key)
    wh.execute(f"DROP TABLE IF EXISTS {q_tmp}")
    wh.execute(
        f"CREATE TABLE {q_tmp} ({column_defs(keys.schema, wh.features, entity.unique_key)})"
        " ENGINE = Memory"
    )
    try:
        wh.insert_arrow(names.database, tmp, keys)
        versions = wh.query_arrow(
            f"{select} WHERE ({key_cols}) IN (SELECT {key_cols} FROM {q_tmp})"
        )
    finally:
        wh.execute(f"DROP TABLE IF EXISTS {q_tmp}")
    return invariant_violations(spec_for(entity), versions)


FULL_CHECK_SHARE = 0.2


def apply_batch(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch_id: str,
    force_deletes: bool = False,
    names: Names | None = None,
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
    incoming = read_incoming(wh, database, entity, batch_id)
    if incoming.num_columns == 0 and not wh.table_exists(database, names.storage):
        return StageResult()
    if incoming.num_columns:
        ensure_storage(wh, names, entity, incoming.schema)
    if incoming.num_columns == 0:
        incoming = _empty_like_storage(wh, names, entity)
    current = read_current(wh, names, entity, batch_id)
    present = read_present_keys(wh, database, entity, batch_id)
    d = diff(
        spec_for(entity, force_deletes),
        current,
        incoming,
        effective_time(wh, names, batch_id),
        present,
        read_ended(wh, names, entity, batch_id),
    )
    write_diff(wh, names, d, batch_id)
    few = d.touched.num_rows <= FULL_CHECK_SHARE * max(d.live_before, 1)
    problems = check_invariants(wh, names, entity, d.touched if few else None)
    if problems:
        raise InvariantError("SCD2 invariants broken:\n" + "\n".join(problems))
    return StageResult(
        rows_in=incoming.num_rows,
        rows_out=d.opened.num_rows + d.tombstones.num_rows,
        versions_opened=d.opened.num_rows + d.tombstones.num_rows,
        versions_closed=d.closed.num_rows,
    )


def _empty_like_storage(wh: Warehouse, names: Names, entity: Entity) -> pa.Table:
    """An empty batch with the key columns (an empty full extract: everything disappeared)."""
    cols = ", ".join(quote_ident(k) for k in entity.unique_key)
    return wh.query_arrow(f"SELECT {cols} FROM {names.q_storage} WHERE 0")


__all__ = ["TS", "Names", "apply_batch", "batch_time", "check_invariants", "spec_for"]
