"""Load raw: a staged batch -> `raw_<entity>` (MergeTree, partitioned by month of `_loaded_at`).

Raw tables keep every batch as extracted, with `_batch_id`, `_loaded_at`, `_row_hash` and the
snapshot's change-detection hash (`_check_hash`, over the columns `_check_cols` names), computed
here while the part is in Arrow anyway. The raw table is the contract between Load and
Snapshot, and this package its only writer. Loading is exactly-once per batch: a rerun first
deletes what a crashed attempt inserted, and the marker row is written after the data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pipeline.config import Entity
from pipeline.core import hashing
from pipeline.core.errors import LoadError
from pipeline.core.hashing import check_signature, encode_key, row_hash
from pipeline.core.manifest import Manifest
from pipeline.core.names import CHECK_COLS, CHECK_HASH, LOAD_META_COLUMNS, OP, RAW_META_COLUMNS, SEQ
from pipeline.load.drift import align
from pipeline.load.retention import ttl_clause
from pipeline.load.unchanged import fill_unchanged
from pipeline.staging import Store, read_parts
from pipeline.state import StageResult, failpoint
from pipeline.warehouse import Warehouse, arrow_to_clickhouse, qualified, quote_ident
from pipeline.warehouse.ddl import TableSpec, alter_table, create_table, delete_where

if TYPE_CHECKING:
    import pyarrow as pa

META_COLUMNS = RAW_META_COLUMNS
# the hash columns a raw table created before they existed gains (old rows: 0 and '')
CHECK_META = {"_check_hash": "UInt64", "_check_cols": "String"}


def ensure_raw_table(wh: Warehouse, database: str, entity: Entity, schema: pa.Schema) -> None:
    """Create the raw table on first load; later columns are added by `align`."""
    wh.create_database(database)
    cols = ", ".join(
        f"{quote_ident(f.name)}"
        f" {arrow_to_clickhouse(f.type, wh.features, nullable=f.name not in (OP, SEQ))}"
        for f in schema
        if f.name not in LOAD_META_COLUMNS
    )
    ts = wh.features.timestamp_type
    columns = (
        f"{cols}, `_batch_id` String, `_loaded_at` {ts}, `_row_hash` UInt64,"
        " `_check_hash` UInt64, `_check_cols` String"
    )
    spec = TableSpec(
        columns,
        partition_by="toYYYYMM(_loaded_at)",
        order_by="(_batch_id)",
        ttl=ttl_clause(wh, entity),
        shard_by=entity.unique_key,
    )
    create_table(wh, database, entity.raw_table, spec)
    ensure_check_columns(wh, database, entity, wh.columns(database, entity.raw_table))


def with_check_hash(part: pa.Table, entity: Entity) -> pa.Table:
    """Append `_check_hash` and `_check_cols` to a part (source columns only, no raw meta)."""
    return hashing.with_check_hash(part, entity.check_cols, META_COLUMNS)


def _change_hashed(staged: pa.Table, part: pa.Table, entity: Entity, untouched: bool) -> pa.Table:
    """`part` with its change hash: the one staged with it while it still fits, else new.

    A change source hashes its rows while it waits on the log. That hash fits while the load
    left the rows as staged (`untouched`: no timestamp cut to seconds, no unchanged value
    filled in; and no column widened) and covers the columns the entity checks now.
    """
    if CHECK_HASH in part.column_names:
        signature = part.column(CHECK_COLS)[0].as_py() if part.num_rows else None
        if (
            untouched
            and signature == check_signature(entity.check_cols)
            and all(staged.schema.field(f.name).type == f.type for f in part.schema)
        ):
            return part
        part = part.drop_columns([CHECK_HASH, CHECK_COLS])
    return with_check_hash(part, entity)


def discard_partial(wh: Warehouse, database: str, table: str, batch_id: str) -> int:
    """Delete rows a crashed attempt left for this batch; returns how many there were."""
    return delete_where(wh, database, table, "_batch_id = %(b)s", {"b": batch_id})


def already_loaded(
    wh: Warehouse, database: str, entity: Entity, lower: datetime, batch_id: str
) -> pa.Array:
    """Encoded (key, row hash) of loaded rows that a re-read may repeat unchanged.

    Inside the lookback zone any earlier copy will do: `updated_at` is hashed, so an equal
    hash is the same version. Rows without `updated_at` are re-read by every batch; one of
    those is a repeat only of its key's newest loaded row (it may have changed and changed
    back, which an older copy would hide).
    """
    import pyarrow as pa

    keys = ", ".join(quote_ident(k) for k in entity.unique_key)
    assert entity.updated_at is not None
    table = qualified(database, entity.raw_table)
    ts = quote_ident(entity.updated_at)
    existing = wh.query_arrow(
        f"SELECT DISTINCT {keys}, _row_hash FROM {table}"
        f" WHERE {ts} >= %(lower)s AND _batch_id != %(b)s"
        f" UNION ALL SELECT {keys}, argMax(_row_hash, _batch_id) AS _row_hash FROM {table}"
        f" WHERE _batch_id != %(b)s AND ({keys}) IN"
        f" (SELECT {keys} FROM {table} WHERE isNull({ts}) AND _batch_id != %(b)s)"
        f" GROUP BY {keys}",
        {"lower": _to_warehouse_time(lower, wh), "b": batch_id},
    )
    if existing.num_rows == 0:
        return pa.array([], pa.string())
    return _key_hash(existing, entity)


def _to_warehouse_time(value: datetime, wh: Warehouse) -> datetime:
    """Round down to what the warehouse stores (seconds on servers without DateTime64)."""
    value = value.astimezone(UTC)
    return value if wh.features.datetime64 else value.replace(microsecond=0)


def _key_hash(table: pa.Table, entity: Entity) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(
        encode_key(table, entity.unique_key), pc.cast(table.column("_row_hash"), pa.string()), "|"
    )


def _row_hashes(part: pa.Table, sources: list[str], entity: Entity) -> pa.Array:
    """Row hashes serve the lookback dedup of incremental sources; full scans store 0."""
    import pyarrow as pa

    if entity.incremental:
        if entity.check_cols is None:  # the same hash `with_check_hash` computed
            return part.column("_check_hash").combine_chunks()
        return row_hash(part, sources)
    return pa.repeat(pa.scalar(0, pa.uint64()), part.num_rows)


def _truncate_timestamps(part: pa.Table, wh: Warehouse) -> pa.Table:
    """On servers without DateTime64 the stored value is whole seconds; hash what is stored."""
    import pyarrow as pa

    if wh.features.datetime64:
        return part
    for i, field in enumerate(part.schema):
        if pa.types.is_timestamp(field.type):
            col = part.column(i).cast(pa.timestamp("s", "UTC"), safe=False)
            part = part.set_column(i, field, col.cast(field.type))
    return part


def load_batch(
    wh: Warehouse, database: str, entity: Entity, store: Store, manifest: Manifest
) -> StageResult:
    """Insert every staged part of a batch (minus rows the lookback re-read unchanged)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    loaded_at = datetime.now(UTC)
    lower = manifest.window.get("lower") if entity.incremental else None
    skip: pa.Array | None = None
    rows_in = rows_out = 0
    if manifest.parts:  # a batch with no parts cannot have left rows behind
        discard_partial(wh, database, entity.raw_table, manifest.batch_id)
    for part in read_parts(store, manifest):
        rows_in += part.num_rows
        ensure_raw_table(wh, database, entity, part.schema)
        missing = [k for k in entity.unique_key if k not in part.column_names]
        if missing:
            raise LoadError(
                f"{entity.name} batch {manifest.batch_id}: unique_key column(s) {missing} missing"
            )
        truncated = _truncate_timestamps(part, wh)
        aligned = align(wh, database, entity, truncated)
        filled = fill_unchanged(wh, database, entity, aligned)
        sources = [c for c in filled.column_names if c not in META_COLUMNS]
        untouched = truncated is part and filled is aligned
        part = _change_hashed(part, filled, entity, untouched)
        part = part.append_column("_row_hash", _row_hashes(part, sources, entity))
        if lower is not None:
            if skip is None:
                skip = already_loaded(
                    wh, database, entity, datetime.fromisoformat(lower), manifest.batch_id
                )
            if len(skip):
                part = part.filter(pc.invert(pc.is_in(_key_hash(part, entity), value_set=skip)))
        n = part.num_rows
        part = part.append_column("_batch_id", pa.repeat(pa.scalar(manifest.batch_id), n))
        part = part.append_column(
            "_loaded_at", pa.repeat(pa.scalar(loaded_at, pa.timestamp("us", "UTC")), n)
        )
        wh.insert_arrow(database, entity.raw_table, part)
        rows_out += n
        failpoint("raw-after-part", f"{entity.name} batch {manifest.batch_id}")
    return StageResult(rows_in=rows_in, rows_out=rows_out)


def ensure_check_columns(
    wh: Warehouse, database: str, entity: Entity, existing: dict[str, str]
) -> None:
    """Give a raw table made before change hashes were stored their columns (rows: 0, '')."""
    for name, ch_type in CHECK_META.items():
        if name not in existing:
            add = f"ADD COLUMN {quote_ident(name)} {ch_type}"
            alter_table(wh, database, entity.raw_table, [add])
