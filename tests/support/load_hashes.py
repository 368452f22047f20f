"""Whether the change hashes the load stored equal those of the rows read back from raw.

The snapshot compares stored hashes with hashes of versions; those of adopted dbt tables and
rehashed batches are computed from data read back from the warehouse. So a type whose value
reads back in another canonical text would re-version every row once: the type tests check
every type they load with this.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Entity
from pipeline.core.hashing import row_hash
from pipeline.load.raw import META_COLUMNS


def hash_mismatches(
    wh: Any, database: str, entity: Entity, batch: str | None = None
) -> list[dict[str, Any]]:
    """Rows of raw (of one batch) whose stored `_check_hash` differs from a fresh hash."""
    import pyarrow.compute as pc

    where = "" if batch is None else "WHERE _batch_id = %(b)s"
    table = wh.query_arrow(f"SELECT * FROM `{database}`.`{entity.raw_table}` {where}", {"b": batch})
    sources = [c for c in table.column_names if c not in META_COLUMNS]
    hashed = sources if entity.check_cols is None else list(entity.check_cols)
    differs = pc.not_equal(row_hash(table, hashed), table.column("_check_hash").combine_chunks())
    return table.filter(differs).select(sources).to_pylist()
