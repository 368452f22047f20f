"""Raw retention: full-scan entities append a whole copy per batch, so their raw tables (and
reconciliation key lists) are bounded by `raw_retention_days`.

A ClickHouse TTL where the server has it (set when the table is created); on older servers,
whole months whose newest row is past retention are dropped after each load (the month of the
newest load is never dropped). Snapshots are never touched.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.config import Entity
from pipeline.core.names import keys_table
from pipeline.warehouse import Warehouse, qualified
from pipeline.warehouse.ddl import drop_partition


def ttl_clause(wh: Warehouse, entity: Entity) -> str:
    """Raw retention as a TTL clause, for full-scan entities on servers that have TTL."""
    if entity.keeps_raw_history or entity.raw_retention_days <= 0 or not wh.features.ttl:
        return ""
    seconds = int(entity.raw_retention_days * 86400)
    return f" TTL toDateTime(_loaded_at) + INTERVAL {seconds} SECOND"


def drop_expired_partitions(
    wh: Warehouse, database: str, table: str, days: float, now: datetime
) -> list[int]:
    """Retention without TTL: drop whole months whose newest row is older than `days`.

    The month holding the newest load is never dropped, so the latest batch always stays.
    """
    if days <= 0 or not wh.table_exists(database, table):
        return []
    q_table = qualified(database, table)
    months = wh.query_rows(
        f"SELECT toYYYYMM(_loaded_at) AS p, max(_loaded_at) FROM {q_table} GROUP BY p ORDER BY p"
    )
    if len(months) < 2:
        return []
    cutoff = now - timedelta(days=days)
    dropped = []
    for month, newest in months[:-1]:
        newest = newest if newest.tzinfo else newest.replace(tzinfo=UTC)
        if newest < cutoff:
            drop_partition(wh, database, table, int(month))
            dropped.append(int(month))
    return dropped


def apply_retention(wh: Warehouse, database: str, entity: Entity) -> list[int]:
    """Bound the growth of full-scan raw copies and reconciliation key lists."""
    now = datetime.now(UTC)
    dropped = []
    if not entity.keeps_raw_history and not wh.features.ttl:
        dropped += drop_expired_partitions(
            wh, database, entity.raw_table, entity.raw_retention_days, now
        )
    if entity.reconcile:
        dropped += drop_expired_partitions(
            wh, database, keys_table(entity.name), entity.raw_retention_days, now
        )
    return dropped
