"""The warehouse: a ClickHouse server or embedded chDB, behind one small interface.

`base` is the interface and the server's features, `sql` the quoting, `types` the type map in
both directions, `ddl` the shared multi-step statements; `server` and `embedded` the backends.
"""

from __future__ import annotations

from pipeline.core.errors import WarehouseError
from pipeline.warehouse.base import Features, Warehouse
from pipeline.warehouse.embedded import EmbeddedWarehouse
from pipeline.warehouse.server import ServerWarehouse
from pipeline.warehouse.sql import literal, qualified, quote_ident
from pipeline.warehouse.types import arrow_to_clickhouse, column_defs

__all__ = [
    "Features",
    "Warehouse",
    "WarehouseError",
    "arrow_to_clickhouse",
    "column_defs",
    "connect",
    "literal",
    "qualified",
    "quote_ident",
]


def connect(url: str) -> Warehouse:
    """Open the warehouse a CDC_WAREHOUSE_URL names (chdb:///path or clickhouse://...)."""
    if url.startswith("chdb://"):
        return EmbeddedWarehouse(url)
    if url.startswith("clickhouse://"):
        return ServerWarehouse(url)
    raise WarehouseError(f"CDC_WAREHOUSE_URL must start with chdb:// or clickhouse://, got {url!r}")
