"""Snapshot maintenance: rebuild history from raw batches, adopt a table dbt built.

Both write into a side table and swap it in at the end, so readers keep the old history until
the new one is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core.errors import SnapshotError
from pipeline.core.hashing import row_hash
from pipeline.snapshot.apply import apply
from pipeline.snapshot.invariants import BUCKET_ROWS, check_invariants
from pipeline.snapshot.storage import INTERNAL, Names, ensure_storage, ensure_view
from pipeline.warehouse import Warehouse, qualified, quote_ident
from pipeline.warehouse.ddl import drop_table, rename_table, swap_in

if TYPE_CHECKING:
    import pyarrow as pa

# `_closed_by` of versions that were closed before we took over: sorts before every batch id
CLOSED_BEFORE_ADOPTION = "0"
DBT_REQUIRED = ("dbt_scd_id", "dbt_updated_at", "dbt_valid_from", "dbt_valid_to")


def raw_batches(wh: Warehouse, database: str, entity: Entity) -> list[str]:
    if not wh.table_exists(database, entity.raw_table):
        return []
    rows = wh.query_rows(
        f"SELECT DISTINCT _batch_id FROM {qualified(database, entity.raw_table)} ORDER BY _batch_id"
    )
    return [r[0] for r in rows]


def rebuild(
    wh: Warehouse,
    database: str,
    entity: Entity,
    force_deletes: bool = False,
    bucket_rows: int = BUCKET_ROWS,
    before_each: Callable[[str], object] | None = None,
) -> int:
    """Replay every raw batch in order into a fresh history, then swap it in.

    Returns the number of batches replayed. The result equals the incrementally built history
    for the batches the raw table still holds (raw retention bounds how far back that goes).
    `before_each(batch_id)` runs before each batch is applied (the CLI rehashes it there).
    """
    live = Names.of(database, entity)
    side = Names(database, None, f"{live.storage}__rebuild")
    drop_table(wh, database, side.storage)
    batches = raw_batches(wh, database, entity)
    for batch in batches:
        if before_each is not None:
            before_each(batch)
        apply(wh, database, entity, batch, force_deletes, side, bucket_rows)
    if not wh.table_exists(database, side.storage):
        raise SnapshotError(f"{entity.name}: no raw batches to rebuild from", entity=entity.name)
    swap_in(wh, database, side.storage, live.storage)
    ensure_view(wh, live, entity)
    return len(batches)


def adopt(wh: Warehouse, database: str, entity: Entity, table: str | None = None) -> int:
    """Continue the history of a dbt snapshot table (same columns) in place.

    The dbt table's rows become our versions (dbt_scd_id and validity kept, hashes computed with
    our rule), the dbt table is kept as `<table>__dbt`, and `<entity>_snapshot` becomes our view:
    downstream queries keep working. Returns the number of versions adopted.
    """
    names = Names.of(database, entity)
    source = table or entity.snapshot_table
    if wh.table_exists(database, names.storage):
        raise SnapshotError(f"{entity.name}: {names.storage} exists already; nothing to adopt")
    versions = _read_dbt_table(wh, database, source, entity)
    side = Names(database, None, f"{names.storage}__adopt")
    drop_table(wh, database, side.storage)
    source_schema = versions.select([c for c in versions.column_names if c not in INTERNAL])
    source_cols = [c for c in source_schema.column_names if not c.startswith("dbt_")]
    ensure_storage(wh, side, entity, source_schema.select(source_cols).schema)
    stored = wh.columns(database, side.storage)
    wh.insert_arrow(
        database, side.storage, versions.select([c for c in versions.column_names if c in stored])
    )
    problems = check_invariants(wh, side, entity)
    if problems:
        drop_table(wh, database, side.storage)
        raise SnapshotError("the dbt table breaks SCD2 invariants:\n" + "\n".join(problems))
    swap_in(wh, database, side.storage, names.storage)  # no live storage: a rename
    if source == entity.snapshot_table:
        rename_table(wh, database, source, f"{source}__dbt")
    ensure_view(wh, names, entity)
    return int(versions.num_rows)


def _read_dbt_table(wh: Warehouse, database: str, table: str, entity: Entity) -> pa.Table:
    """The dbt rows with meta columns under our names and our internal columns added."""
    import pyarrow as pa

    if not wh.table_exists(database, table):
        raise SnapshotError(f"{entity.name}: table {database}.{table} not found")
    columns = wh.columns(database, table)
    renamed = {entity.meta_name(c): c for c in (*DBT_REQUIRED, "dbt_is_deleted")}
    missing = [renamed.get(c, c) for c in DBT_REQUIRED if entity.meta_name(c) not in columns]
    missing += [k for k in entity.unique_key if k not in columns]
    if missing:
        raise SnapshotError(
            f"{database}.{table} is not a dbt snapshot of {entity.name}: "
            f"missing column(s) {missing}"
        )
    select = ", ".join(f"{quote_ident(c)} AS {quote_ident(renamed.get(c, c))}" for c in columns)
    table_data = wh.query_arrow(f"SELECT {select} FROM {qualified(database, table)}")
    ts = pa.timestamp("us", "UTC")
    for name in ("dbt_updated_at", "dbt_valid_from", "dbt_valid_to"):
        index = table_data.column_names.index(name)
        table_data = table_data.set_column(index, name, table_data.column(name).cast(ts))
    if "dbt_is_deleted" not in table_data.column_names and entity.hard_deletes == "new_record":
        table_data = table_data.append_column(
            "dbt_is_deleted", pa.array(["False"] * table_data.num_rows, pa.string())
        )
    source = [c for c in table_data.column_names if not c.startswith("dbt_")]
    hash_cols = list(entity.check_cols) if entity.check_cols is not None else source
    n = table_data.num_rows
    is_open = table_data.column("dbt_valid_to").is_null()
    closed_by = pa.array(
        ["" if o else CLOSED_BEFORE_ADOPTION for o in is_open.to_pylist()], pa.string()
    )
    return (
        table_data.append_column("_hash", row_hash(table_data, hash_cols))
        .append_column("_opened_by", pa.array([""] * n, pa.string()))
        .append_column("_closed_by", closed_by)
        .append_column("_version", pa.array([1] * n, pa.uint64()))
    )
