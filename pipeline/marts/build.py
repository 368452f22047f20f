"""Building a mart beside the live one, then swapping it in.

``table``: ``CREATE TABLE <name>__new ... AS <select>``, then swap it in (``EXCHANGE TABLES``
on servers and databases that have it, else one ``RENAME TABLE`` statement for both names),
then drop the previous version: readers see the old mart or the new one, never a missing or
half-built one, and a failed build leaves the old mart untouched. ``view`` takes the same path
with ``CREATE VIEW``, which is atomic on ClickHouse 18.16 too (it has no ``CREATE OR REPLACE``).

On a cluster (``[cdc] cluster``) a table mart is sharded like the pipeline's other tables and
the swap renames its local tables on every node (``pipeline.warehouse.ddl.swap_in``).
"""

from __future__ import annotations

import logging

from pipeline.core.errors import MartError, WarehouseError
from pipeline.core.names import check_name
from pipeline.marts.header import is_merge_tree
from pipeline.marts.project import Mart
from pipeline.warehouse import Warehouse, qualified, quote_ident
from pipeline.warehouse.cluster import user_sql
from pipeline.warehouse.ddl import TableSpec, create_table, create_view, drop_table, swap_in

log = logging.getLogger("pipeline.marts")


def create_statement(database: str, mart: Mart, table: str) -> str:
    """The DDL that materializes ``mart`` as ``database.table``."""
    target = qualified(database, table)
    if mart.materialized == "view":
        return f"CREATE VIEW {target} AS\n{mart.sql}"
    engine = mart.engine or "MergeTree"
    clauses = [f"CREATE TABLE {target} ENGINE = {engine}"]
    if is_merge_tree(engine):
        if mart.partition_by:
            clauses.append(f"PARTITION BY {mart.partition_by}")
        clauses.append(f"ORDER BY {mart.order_by or 'tuple()'}")
    return "\n".join(clauses) + f" AS\n{mart.sql}"


def materialize(wh: Warehouse, database: str, mart: Mart, table: str) -> None:
    """Create ``table`` as the mart: one statement on a server; on a cluster a view on every
    node, or a replicated table on every node filled through its Distributed table.

    A mart table holds no unique key of ours, so rows go to any shard, except for engines that
    merge rows with equal sorting keys (Replacing, Summing, ...): those rows share a shard.
    """
    if wh.cluster is None:
        wh.execute(create_statement(database, mart, table))
        return
    if mart.materialized == "view":
        create_view(wh, database, table, mart.sql)
        return
    engine = mart.engine or "MergeTree"
    if not is_merge_tree(engine):
        raise MartError(f"{mart.path}: engine {engine}: a mart table on a cluster is MergeTree")
    order_by = mart.order_by or "tuple()"
    merging = engine.split("(", 1)[0] != "MergeTree" and order_by != "tuple()"
    spec = TableSpec(
        _columns(wh, mart),
        engine,
        order_by=order_by,
        partition_by=mart.partition_by,
        fresh=True,
        sharding=f"cityHash64({order_by})" if merging else None,
    )
    create_table(wh, database, table, spec)
    with user_sql(wh):
        wh.execute(f"INSERT INTO {qualified(database, table)}\n{mart.sql}")


def _columns(wh: Warehouse, mart: Mart) -> str:
    """The column definitions of the mart's SELECT, as the server types it."""
    described = wh.query_rows(f"DESCRIBE TABLE (\n{mart.sql}\n)")
    return ", ".join(f"{quote_ident(row[0])} {row[1]}" for row in described)


def build(wh: Warehouse, database: str, mart: Mart) -> int:
    """Build ``mart`` beside the live one and swap it in; returns its row count.

    On failure the half-built ``<name>__new`` is dropped and the previous mart stays live.
    """
    check_name(database, "database")
    staging = f"{mart.name}__new"
    drop_table(wh, database, staging)
    try:
        materialize(wh, database, mart, staging)
        rows = int(wh.scalar(f"SELECT count() FROM {qualified(database, staging)}"))
    except WarehouseError as exc:
        _drop_quietly(wh, database, staging)
        raise MartError(
            f"{mart.path}: building {mart.name} failed; the previous version is unchanged: {exc}"
        ) from exc
    swap_in(wh, database, staging, mart.name)
    log.info("built %s.%s (%s, %d rows)", database, mart.name, mart.materialized, rows)
    return rows


def _drop_quietly(wh: Warehouse, database: str, table: str) -> None:
    """Best-effort cleanup after a failed build; the build error is what the user needs."""
    try:
        drop_table(wh, database, table)
    except WarehouseError as exc:
        log.warning("could not drop %s.%s after a failed build: %s", database, table, exc)
