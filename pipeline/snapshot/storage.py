"""Snapshot storage: the versions table, the public view over it, and what they hold.

Storage is `<name>_snapshot__versions`, a ReplacingMergeTree keyed by (unique_key,
dbt_valid_from): closing a version re-inserts it with `dbt_valid_to` set and a higher
`_version`, so nothing is ever UPDATEd. `<name>_snapshot` is a view over it with FINAL, so a
plain SELECT returns exact history at any moment, even in the middle of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core.batch import batch_time
from pipeline.core.names import keys_table
from pipeline.warehouse import Warehouse, arrow_to_clickhouse, literal, qualified, quote_ident
from pipeline.warehouse.ddl import TableSpec, alter_table, create_table, create_view, drop_table
from pipeline.warehouse.sql import timestamp_sql

if TYPE_CHECKING:
    import pyarrow as pa

# columns of the storage that the view does not show
INTERNAL = ("_hash", "_opened_by", "_closed_by", "_version")


@dataclass(frozen=True)
class Names:
    """Where a snapshot lives; side tables (rebuilds, adoptions) have no view of their own."""

    database: str
    view: str | None
    storage: str

    @classmethod
    def of(cls, database: str, entity: Entity) -> Names:
        return cls(database, entity.snapshot_table, entity.storage_table)

    @property
    def q_storage(self) -> str:
        return qualified(self.database, self.storage)

    @property
    def q_view(self) -> str:
        assert self.view is not None
        return qualified(self.database, self.view)


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
        spec = TableSpec(
            ", ".join(cols + meta),
            "ReplacingMergeTree(_version)",
            order_by=f"({order})",
            shard_by=entity.unique_key,
            fresh=names.view is None,  # a side table (rebuild, adoption) is swapped in later
        )
        create_table(wh, names.database, names.storage, spec)
    existing = wh.columns(names.database, names.storage)
    added = [
        f"ADD COLUMN {quote_ident(f.name)} {arrow_to_clickhouse(f.type, wh.features)}"
        for f in schema
        if f.name not in existing and not pa.types.is_null(f.type)
    ]
    alter_table(wh, names.database, names.storage, added)
    if names.view is not None:
        ensure_view(wh, names, entity)


def holds_columns(wh: Warehouse, names: Names, columns: list[str]) -> bool:
    """Whether storage exists with every one of `columns` (then `ensure_storage` would only
    check the view, and the raw columns' Arrow types need not be read)."""
    if not wh.table_exists(names.database, names.storage):
        return False
    stored = wh.columns(names.database, names.storage)
    return all(c in stored for c in columns)


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
            expression = f"ifNull(dbt_valid_to, {timestamp_sql(wh.features.datetime64, far)})"
        columns.append((entity.meta_name(column), expression))
    return columns


def ensure_view(wh: Warehouse, names: Names, entity: Entity) -> None:
    """(Re)create the public view when its columns changed (new source columns, renames)."""
    columns = view_columns(wh, names, entity)
    assert names.view is not None
    if wh.table_exists(names.database, names.view):
        if list(wh.columns(names.database, names.view)) == [name for name, _ in columns]:
            return
        drop_table(wh, names.database, names.view)
    select = ", ".join(
        expr if expr == quote_ident(name) else f"{expr} AS {quote_ident(name)}"
        for name, expr in columns
    )
    create_view(wh, names.database, names.view, f"SELECT {select} FROM {names.q_storage} FINAL")


def raw_schema(wh: Warehouse, database: str, entity: Entity, columns: list[str]) -> pa.Schema:
    """The Arrow types of raw columns, as the warehouse returns them (no rows are read)."""
    select = ", ".join(quote_ident(c) for c in columns)
    table = qualified(database, entity.raw_table)
    return wh.query_arrow(f"SELECT {select} FROM {table} WHERE 0").schema


def reconciled(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> bool:
    """Whether this batch has a key list; an empty one proves nothing, so it retires nothing."""
    table = keys_table(entity.name)
    if not entity.reconcile or not wh.table_exists(database, table):
        return False
    count = wh.scalar(
        f"SELECT count() FROM {qualified(database, table)} WHERE _batch_id = %(b)s",
        {"b": batch_id},
    )
    return bool(count)


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


def count_versions(wh: Warehouse, names: Names) -> tuple[int, int]:
    """All stored versions, and those not known to be closed (at least the current ones)."""
    stored, current = wh.query_rows(
        f"SELECT count(), countIf(_closed_by = '') FROM {names.q_storage}"
    )[0]
    return int(stored), int(current or 0)
