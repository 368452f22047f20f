"""The warehouse: a ClickHouse server or embedded chDB, behind one small interface."""

from __future__ import annotations

from pipeline.warehouse.base import (
    Features,
    Warehouse,
    WarehouseError,
    arrow_to_clickhouse,
    check_name,
    column_defs,
    literal,
    qualified,
    quote_ident,
)

__all__ = [
    "Features",
    "Warehouse",
    "WarehouseError",
    "arrow_to_clickhouse",
    "check_name",
    "column_defs",
    "connect",
    "literal",
    "qualified",
    "quote_ident",
]


def connect(url: str) -> Warehouse:
    """Open the warehouse a CDC_WAREHOUSE_URL names (chdb:///path or clickhouse://...)."""
    if url.startswith("chdb://"):
        from pipeline.warehouse.embedded import EmbeddedWarehouse

        return EmbeddedWarehouse(url)
    if url.startswith("clickhouse://"):
        from pipeline.warehouse.server import ServerWarehouse

        return ServerWarehouse(url)
    raise WarehouseError(f"CDC_WAREHOUSE_URL must start with chdb:// or clickhouse://, got {url!r}")
