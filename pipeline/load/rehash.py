"""Rehash: give a raw batch the change hashes of the entity's current `check_cols`.

Loads hash the configured columns; after a `check_cols` change (or for raw rows loaded before
hashes were stored) the snapshot stage cannot use a batch's stored hashes, so the batch is
rewritten here, by the raw table's only writer, before the snapshot reads it.
"""

from __future__ import annotations

from pipeline.config import Entity
from pipeline.core.hashing import check_signature
from pipeline.load.raw import ensure_check_columns, with_check_hash
from pipeline.warehouse import Warehouse, qualified, quote_ident
from pipeline.warehouse.buckets import Buckets
from pipeline.warehouse.cluster import no_deduplication
from pipeline.warehouse.ddl import delete_where


def ensure_current_hashes(
    wh: Warehouse, database: str, entity: Entity, batch_id: str, bucket_rows: int
) -> bool:
    """Make every row of the batch carry hashes of the current `check_cols`; whether it had to.

    Raw tables made before hashes were stored gain the columns first (old rows: 0 and '').
    """
    if not wh.table_exists(database, entity.raw_table):
        return False
    ensure_check_columns(wh, database, entity, wh.columns(database, entity.raw_table))
    if not stale(wh, database, entity, batch_id):
        return False
    return rehash(wh, database, entity, batch_id, bucket_rows)


def rehash(wh: Warehouse, database: str, entity: Entity, batch_id: str, bucket_rows: int) -> bool:
    """Give a batch the change hashes of the entity's current `check_cols`, if it lacks them.

    Loads hash the configured columns; after a `check_cols` change (or for raw rows loaded
    before hashes were stored) the batch is copied with new hashes, then the old copy goes.
    The fullest old copy is the source, and a half-written new copy from a crash is dropped
    first, so a crash anywhere leaves a batch that a rerun completes. Returns whether it ran.
    """
    table = qualified(database, entity.raw_table)
    signature = check_signature(entity.check_cols)
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
        delete_where(
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
            with no_deduplication(wh):  # a crashed attempt's copy, deleted above, is no repeat
                wh.insert_arrow(database, entity.raw_table, with_check_hash(part, entity))
    delete_where(
        wh, database, entity.raw_table, "_batch_id = %(b)s AND _check_cols != %(s)s", params
    )
    return True


def stale(wh: Warehouse, database: str, entity: Entity, batch_id: str) -> bool:
    """Whether any row of the batch lacks hashes of the current `check_cols`."""
    return bool(
        wh.scalar(
            f"SELECT count() FROM {qualified(database, entity.raw_table)}"
            " WHERE _batch_id = %(b)s AND _check_cols != %(s)s",
            {"b": batch_id, "s": check_signature(entity.check_cols)},
        )
    )
