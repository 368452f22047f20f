"""Which merge a batch takes: a batch of changes, or a whole extract (a full scan, a window of
an incremental table, the first load or a resync of a change entity)."""

from __future__ import annotations

from pipeline.config import Entity
from pipeline.snapshot.change_merge import apply_change_batch, batch_rows
from pipeline.snapshot.invariants import BUCKET_ROWS
from pipeline.snapshot.merge import apply_batch
from pipeline.snapshot.storage import Names
from pipeline.state import StageResult
from pipeline.warehouse import Warehouse


def apply(
    wh: Warehouse,
    database: str,
    entity: Entity,
    batch_id: str,
    force_deletes: bool = False,
    names: Names | None = None,
    bucket_rows: int = BUCKET_ROWS,
) -> StageResult:
    """Apply one loaded raw batch to the entity's history (see `merge` and `change_merge`).

    A change batch without rows (nothing changed) is nothing to apply once the history's
    storage exists: a quiet batch costs two queries, not a merge's preparation.
    """
    if entity.captures_changes:
        counts = batch_rows(wh, database, entity, batch_id)
        storage = (names or Names.of(database, entity)).storage
        if not counts.rows and wh.table_exists(database, storage):
            return StageResult()
        if not counts.scanned:
            return apply_change_batch(wh, database, entity, batch_id, names, bucket_rows, counts)
    return apply_batch(wh, database, entity, batch_id, force_deletes, names, bucket_rows)
