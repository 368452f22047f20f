"""The warehouse: a ClickHouse server or embedded chDB, behind one small interface.

`base` is the interface and the server's features, `sql` the quoting, `types` the type map in
both directions, `ddl` the shared multi-step statements; `server` and `embedded` the backends.
"""

from __future__ import annotations

from pipeline.core.errors import ConfigError, WarehouseError
from pipeline.warehouse.base import Features, Warehouse
from pipeline.warehouse.cluster import Cluster
from pipeline.warehouse.embedded import EmbeddedWarehouse
from pipeline.warehouse.server import ServerWarehouse
from pipeline.warehouse.sql import literal, qualified, quote_ident
from pipeline.warehouse.types import arrow_to_clickhouse, column_defs

__all__ = [
    "Cluster",
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


def connect(url: str, cluster: Cluster | None = None) -> Warehouse:
    """Open the warehouse a CDC_WAREHOUSE_URL names (chdb:///path or clickhouse://...), on the
    cluster `[cdc] cluster` names, if any (servers only: chDB is one process, one node)."""
    if url.startswith("chdb://"):
        if cluster is not None:
            raise ConfigError(
                f"CDC_CLUSTER = {cluster.name} needs ClickHouse servers, but CDC_WAREHOUSE_URL"
                " is chDB, which is embedded in one process: set CDC_WAREHOUSE_URL to"
                " clickhouse://<a node of the cluster>, or leave CDC_CLUSTER empty"
            )
        return EmbeddedWarehouse(url)
    if url.startswith("clickhouse://"):
        return ServerWarehouse(url, cluster)
    raise WarehouseError(f"CDC_WAREHOUSE_URL must start with chdb:// or clickhouse://, got {url!r}")
