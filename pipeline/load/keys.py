"""Reconciliation key lists: every key of the table at a batch, in `raw_<entity>__keys`.

Loaded exactly once per batch (a rerun first deletes what a crashed attempt inserted); the
snapshot stage retires the live keys a batch's list no longer has.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.config import Entity
from pipeline.core.manifest import Manifest
from pipeline.core.names import keys_table
from pipeline.staging import Store, read_parts
from pipeline.warehouse import Warehouse, arrow_to_clickhouse, quote_ident
from pipeline.warehouse.ddl import TableSpec, create_table, delete_where


def load_keys(
    wh: Warehouse, database: str, entity: Entity, store: Store, manifest: Manifest
) -> int:
    """Load a batch's full key list (reconciliation) into `raw_<entity>__keys`, exactly once."""
    import pyarrow as pa

    table = keys_table(entity.name)
    loaded_at = datetime.now(UTC)
    rows = 0
    delete_where(wh, database, table, "_batch_id = %(b)s", {"b": manifest.batch_id})
    for part in read_parts(store, manifest):
        if not wh.table_exists(database, table):
            cols = ", ".join(
                f"{quote_ident(f.name)} {arrow_to_clickhouse(f.type, wh.features, nullable=False)}"
                for f in part.schema
            )
            columns = f"{cols}, `_batch_id` String, `_loaded_at` {wh.features.timestamp_type}"
            spec = TableSpec(
                columns,
                partition_by="toYYYYMM(_loaded_at)",
                order_by="(_batch_id)",
                shard_by=entity.unique_key,
            )
            create_table(wh, database, table, spec)
        n = part.num_rows
        part = part.append_column("_batch_id", pa.repeat(pa.scalar(manifest.batch_id), n))
        part = part.append_column(
            "_loaded_at", pa.repeat(pa.scalar(loaded_at, pa.timestamp("us", "UTC")), n)
        )
        wh.insert_arrow(database, table, part)
        rows += n
    return rows
