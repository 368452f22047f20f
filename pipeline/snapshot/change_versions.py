"""The rows a change batch writes to storage, built from its diff in Arrow (pure).

Where the warehouse reads Arrow in SQL (chDB), a change batch writes its versions straight
from the rows it already holds: opened versions from the batch's change rows (a deletion
version from the change before the delete, or from the stored version it repeats), closed
ones from the stored rows read as the keys' live versions. The columns and values are those
of `ChangePlan.open_sql`, `stored_tombstone_sql` and `close_sql`, which park the same diff in
the warehouse elsewhere; only `dbt_scd_id` is left to SQL (`ChangePlan.opened_columns`), so
that an id is the same text whichever way its version was written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.hashing import encode_key
from pipeline.core.names import SEQ

if TYPE_CHECKING:
    import pyarrow as pa


def _encoded(table: pa.Table, keys: list[str]) -> list[str]:
    import pyarrow as pa

    encoded = encode_key(table, keys)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    values: list[str] = encoded.to_pylist()
    return values


def opened_rows(
    opened: pa.Table,
    rows: pa.Table,
    current: pa.Table,
    keys: list[str],
    source: list[str],
    batch_id: str,
    version: int,
    new_record: bool,
) -> list[pa.Table]:
    """The versions of `opened` (`ChangeDiff.opened`) as storage rows, with `_keep_scd_id`.

    `rows`: the bucket's change rows whole (`ChangePlan.rows_sql`); `current`: its keys' live
    versions, whole. One table per origin (change rows, stored versions), as their types may
    differ in what the warehouse reads back.
    """
    import pyarrow as pa

    by_change = {
        (key, seq): row
        for row, (key, seq) in enumerate(
            zip(_encoded(rows, keys), rows.column(SEQ).to_pylist(), strict=True)
        )
    }
    by_key = {key: row for row, key in enumerate(_encoded(current, keys))}
    seqs = opened.column(SEQ).to_pylist()
    from_seqs = opened.column("_from_seq").to_pylist()
    tombstones = opened.column("_tombstone").to_pylist()
    from_change: tuple[list[int], list[int]] = ([], [])
    from_stored: tuple[list[int], list[int]] = ([], [])
    for i, key in enumerate(_encoded(opened, keys)):
        if not tombstones[i]:
            pair, at = from_change, by_change[(key, seqs[i])]
        elif from_seqs[i] is not None:
            pair, at = from_change, by_change[(key, from_seqs[i])]
        else:
            pair, at = from_stored, by_key[key]
        pair[0].append(i)
        pair[1].append(at)
    tables = []
    if from_change[0]:
        o = opened.take(pa.array(from_change[0], pa.int64()))
        src = rows.take(pa.array(from_change[1], pa.int64()))
        meta = _meta(o, src.column("_check_hash"), batch_id, version, new_record, stored=False)
        tables.append(pa.table({**{c: src.column(c) for c in source}, **meta}))
    if from_stored[0]:
        o = opened.take(pa.array(from_stored[0], pa.int64()))
        src = current.take(pa.array(from_stored[1], pa.int64()))
        meta = _meta(o, src.column("_hash"), batch_id, version, new_record, stored=True)
        tables.append(pa.table({**{c: src.column(c) for c in source}, **meta}))
    return tables


def _meta(
    o: pa.Table,
    hashes: pa.ChunkedArray,
    batch_id: str,
    version: int,
    new_record: bool,
    stored: bool,
) -> dict[str, pa.Array | pa.ChunkedArray]:
    """Meta columns of opened versions: from their change (`open_sql`), or, for deletion
    versions that repeat a stored version (`stored`), as `stored_tombstone_sql` has them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = o.num_rows
    valid_to = o.column("dbt_valid_to")
    batch = pa.scalar(batch_id, pa.string())
    replaces = o.column("_replaces")
    meta: dict[str, pa.Array | pa.ChunkedArray] = {
        "dbt_updated_at": o.column("dbt_valid_from" if stored else "dbt_updated_at"),
        "dbt_valid_from": o.column("dbt_valid_from"),
        "dbt_valid_to": valid_to,
        "_hash": hashes,
        "_opened_by": (
            pa.repeat(batch, n) if stored else pc.if_else(replaces, o["_keep_opened_by"], batch)
        ),
        "_closed_by": pc.if_else(pc.is_null(valid_to), pa.scalar("", pa.string()), batch),
        "_version": pa.repeat(pa.scalar(version, pa.uint64()), n),
        # null but where a stored version is rewritten in place (`_replaces`)
        "_keep_scd_id": pa.nulls(n, pa.string()) if stored else o.column("_keep_scd_id"),
    }
    if new_record:
        meta["dbt_is_deleted"] = pc.if_else(o.column("_tombstone"), "True", "False")
    return meta


def stored_closed(current: pa.Table, closed: pa.Table) -> pa.Table:
    """The stored rows the batch closes (`current` holds one row per key, so one per
    dbt_scd_id), with where each now ends (`_new_valid_to`)."""
    import pyarrow as pa

    row_of = {scd_id: row for row, scd_id in enumerate(current.column("dbt_scd_id").to_pylist())}
    rows = pa.array([row_of[s] for s in closed.column("dbt_scd_id").to_pylist()], pa.int64())
    return current.take(rows).append_column("_new_valid_to", closed.column("_new_valid_to"))


def closed_rows(
    closed: pa.Table, current: pa.Table, stored: list[str], batch_id: str, version: int
) -> pa.Table:
    """The stored versions of `closed` (`ChangeDiff.closed`) written back with their new
    end, as `close_sql` writes them from parking."""
    import pyarrow as pa

    whole = stored_closed(current, closed)
    n = whole.num_rows
    overrides = {
        "dbt_valid_to": whole.column("_new_valid_to").cast(whole.schema.field("dbt_valid_to").type),
        "_closed_by": pa.repeat(pa.scalar(batch_id, pa.string()), n),
        "_version": pa.repeat(pa.scalar(version, pa.uint64()), n),
    }
    return pa.table({c: overrides.get(c, whole.column(c)) for c in stored})
