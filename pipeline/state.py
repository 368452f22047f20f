"""Bookkeeping in the warehouse: which stage finished which batch, and the Postgres watermarks.

ClickHouse has no transactions, so a stage writes its data first and its marker row last (the
pattern of luigi.contrib's marker tables). A marker is the Luigi Target: when it is missing the
stage runs again and first removes what a crashed attempt left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.core.errors import FailpointError, WarehouseError
from pipeline.core.names import BATCHES, STATE
from pipeline.warehouse import Warehouse, qualified
from pipeline.warehouse.ddl import TableSpec, create_table, exists_seen, insert_ensured, vanished


def failpoint(name: str, where: str) -> None:
    """Crash here when CDC_FAILPOINT names this point (tests inject crashes this way)."""
    if os.environ.get("CDC_FAILPOINT") == name:
        raise FailpointError(f"failpoint {name} hit: {where}")


def ensure_tables(wh: Warehouse, database: str) -> None:
    wh.create_database(database)
    ts = wh.features.timestamp_type
    batches = (
        "entity String, stage String, batch_id String, rows_in UInt64, rows_out UInt64,"
        f" versions_opened UInt64, versions_closed UInt64, finished_at {ts}"
    )
    state = f"entity String, batch_id String, watermark String, recorded_at {ts}"
    create_table(wh, database, BATCHES, TableSpec(batches, order_by="(entity, stage, batch_id)"))
    create_table(wh, database, STATE, TableSpec(state, order_by="(entity, batch_id)"))


@dataclass(frozen=True)
class StageResult:
    rows_in: int = 0
    rows_out: int = 0
    versions_opened: int = 0
    versions_closed: int = 0


def mark_done(
    wh: Warehouse, database: str, entity: str, stage: str, batch_id: str, result: StageResult
) -> None:
    import pyarrow as pa

    row = pa.table(
        {
            "entity": [entity],
            "stage": [stage],
            "batch_id": [batch_id],
            "rows_in": pa.array([result.rows_in], pa.uint64()),
            "rows_out": pa.array([result.rows_out], pa.uint64()),
            "versions_opened": pa.array([result.versions_opened], pa.uint64()),
            "versions_closed": pa.array([result.versions_closed], pa.uint64()),
            "finished_at": pa.array([datetime.now(UTC)], pa.timestamp("us", "UTC")),
        }
    )
    insert_ensured(wh, database, BATCHES, row, lambda: ensure_tables(wh, database))


def is_done(wh: Warehouse, database: str, entity: str, stage: str, batch_id: str) -> bool:
    """Whether a marker is there: Luigi asks this of every task, before and after it runs."""
    if not exists_seen(wh, database, BATCHES):
        return False
    try:
        return bool(
            wh.scalar(
                f"SELECT count() FROM {qualified(database, BATCHES)}"
                " WHERE entity = %(e)s AND stage = %(s)s AND batch_id = %(b)s",
                {"e": entity, "s": stage, "b": batch_id},
            )
        )
    except WarehouseError:
        if not vanished(wh, database, BATCHES):  # dropped since it was seen: not done
            raise
        return False


def last_done(wh: Warehouse, database: str, entity: str, stage: str) -> str | None:
    """The newest batch id a stage finished for an entity (batch ids sort by time)."""
    if not wh.table_exists(database, BATCHES):
        return None
    value = wh.scalar(
        f"SELECT max(batch_id) FROM {qualified(database, BATCHES)}"
        " WHERE entity = %(e)s AND stage = %(s)s",
        {"e": entity, "s": stage},
    )
    return value or None


def save_position(wh: Warehouse, database: str, entity: str, batch_id: str, position: str) -> None:
    """Record where a loaded batch ended (a watermark as ISO text, to keep microseconds).

    Written only after the batch's raw load has committed, so a crash never skips changes.
    """
    import pyarrow as pa

    ensure_tables(wh, database)
    wh.insert_arrow(
        database,
        STATE,
        pa.table(
            {
                "entity": [entity],
                "batch_id": [batch_id],
                "watermark": [position],
                "recorded_at": pa.array([datetime.now(UTC)], pa.timestamp("us", "UTC")),
            }
        ),
    )


def load_position(wh: Warehouse, database: str, entity: str) -> str | None:
    """Where the newest committed load ended, or None before the first one."""
    if not wh.table_exists(database, STATE):
        return None
    value = wh.scalar(
        f"SELECT argMax(watermark, batch_id) FROM {qualified(database, STATE)}"
        " WHERE entity = %(e)s",
        {"e": entity},
    )
    return str(value) if value else None


def save_watermark(
    wh: Warehouse, database: str, entity: str, batch_id: str, watermark: datetime
) -> None:
    """A PostgreSQL watermark, as the position of its batch."""
    save_position(wh, database, entity, batch_id, watermark.astimezone(UTC).isoformat())


def load_watermark(wh: Warehouse, database: str, entity: str) -> datetime | None:
    """The watermark of the newest committed load, or None before the first one."""
    position = load_position(wh, database, entity)
    return datetime.fromisoformat(position) if position else None
